"""Calibration: corpus, splits, token windows, captured FFN inputs and neuron statistics, on real text and models."""

import logging
import math

import pytest
import torch

import metanet.calib.stats as stats_module
from conftest import MODEL_TYPES
from metanet.calib import (
    calibration_split, capture_ffn_inputs, generated_windows, load_corpus, load_model_and_tokenizer, neuron_stats, split_documents,
    tokenize_documents,
)
from metanet.checkpoints import open_checkpoint
from metanet.errors import MetanetError
from trained_lm import heldout_loss, heldout_windows, train_tiny_causal_lm, unigram_entropy

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def plays() -> list[str]:
    return load_corpus()


@pytest.fixture(scope="module")
def minilm(plays):
    """(checkpoint, model, tokenizer, input_ids [4, 128] of held-out Shakespeare)."""
    checkpoint = open_checkpoint("all-MiniLM-L6-v2")
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    _, heldout = split_documents(plays)
    return checkpoint, model, tokenizer, tokenize_documents(tokenizer, heldout[:1], 512, 128)


@pytest.fixture(scope="module")
def tiny_lm(trained_lm):
    """(checkpoint, model, tokenizer) of the trained tiny LLaMA."""
    checkpoint = open_checkpoint(trained_lm)
    return (checkpoint, *load_model_and_tokenizer(checkpoint))


def record_outputs(modules) -> tuple[list[list[torch.Tensor]], list]:
    """Forward hooks appending each module's output (flattened to [tokens, width]) to outputs[i]."""
    outputs = [[] for _ in modules]
    hook = lambda i: lambda module, args, out: outputs[i].append(out.detach().reshape(-1, out.shape[-1]))  # noqa: E731
    return outputs, [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]


# -- corpus -------------------------------------------------------------------------------
def test_default_corpus_is_the_38_shakespeare_plays_in_a_fixed_order(plays):
    assert len(plays) == 38
    assert all(len(doc) > 50_000 for doc in plays)
    titles = [doc.splitlines()[0] for doc in plays]
    assert titles[0] == "# A Midsummer Night's Dream" and titles[-1] == "# Timon of Athens" and "# Hamlet" in titles
    assert load_corpus() == plays


def test_corpus_from_a_file_and_from_a_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("Zweites Dokument: Grüße, ☃.", encoding="utf-8")
    (tmp_path / "sub" / "a.md").write_text("# First\n\ntext", encoding="utf-8")
    (tmp_path / "notes.json").write_text("{}")
    assert load_corpus(tmp_path) == ["Zweites Dokument: Grüße, ☃.", "# First\n\ntext"]  # sorted by path: b.txt < sub/a.md
    assert load_corpus(tmp_path / "notes.json") == ["{}"]  # a named file is read whatever its suffix


def blank_file(folder):
    (folder / "blank.txt").write_text("  \n\n")
    return folder


def latin1_file(folder):
    (folder / "latin1.txt").write_bytes("café".encode("latin-1"))
    return folder / "latin1.txt"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda folder: folder / "missing", "empty corpus: no such file or folder"),
        (lambda folder: folder, r"empty corpus: no \*.txt / \*.md files under"),
        (blank_file, "empty corpus: .*blank.txt contains no text"),
        (latin1_file, "latin1.txt: not UTF-8 text"),
    ],
    ids=["missing", "empty-folder", "blank-file", "not-utf8"],
)
def test_bad_corpus_is_refused_with_a_clear_message(tmp_path, make, message):
    with pytest.raises(MetanetError, match=message):
        load_corpus(make(tmp_path))


# -- splits -------------------------------------------------------------------------------
def test_split_is_disjoint_seeded_and_keeps_every_play(plays):
    calib, heldout = split_documents(plays, heldout_fraction=0.2, seed=0)
    assert (len(calib), len(heldout)) == (30, 8)
    assert not set(calib) & set(heldout)
    assert sorted(calib + heldout) == sorted(plays)
    assert split_documents(plays, 0.2, seed=0) == (calib, heldout)
    assert split_documents(plays, 0.2, seed=1)[1] != heldout


def test_a_single_document_is_split_by_chunks_of_paragraphs(plays):
    calib, heldout = split_documents([plays[0]], heldout_fraction=0.2, seed=0)
    assert (len(calib), len(heldout)) == (8, 2)
    assert not set(calib) & set(heldout)
    paragraphs = lambda docs: [p for doc in docs for p in doc.split("\n\n")]  # noqa: E731
    assert sorted(paragraphs(calib + heldout)) == sorted(p for p in paragraphs([plays[0]]) if p.strip())


@pytest.mark.parametrize("docs, fraction", [(["one"], 0.2), (["a", "b"], 0.0), (["a", "b"], 1.0)])
def test_split_refuses_what_cannot_be_split(docs, fraction):
    with pytest.raises(MetanetError):
        split_documents(docs, fraction)


# -- token windows ------------------------------------------------------------------------
def test_token_windows_have_the_asked_shape_are_seeded_and_come_from_the_text(minilm, plays):
    _, _, tokenizer, _ = minilm
    docs = plays[:2]
    ids = tokenize_documents(tokenizer, docs, n_tokens=1000, seq_len=64, seed=0)
    assert ids.shape == (math.ceil(1000 / 64), 64) and ids.dtype == torch.long
    assert torch.equal(ids, tokenize_documents(tokenizer, docs, 1000, 64, seed=0))
    assert not torch.equal(ids, tokenize_documents(tokenizer, docs, 1000, 64, seed=1))
    assert len({tuple(w) for w in ids.tolist()}) == ids.shape[0]  # distinct windows
    stream = [t for doc in docs for t in tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.sep_token_id]]
    joined = "," + ",".join(map(str, stream)) + ","
    assert all("," + ",".join(map(str, w)) + "," in joined for w in ids.tolist())


def test_too_little_text_for_the_asked_tokens_is_refused(minilm):
    _, _, tokenizer, _ = minilm
    with pytest.raises(MetanetError, match="not enough text: 13 tokens give 0 windows of 128, but 300 tokens need 3"):
        tokenize_documents(tokenizer, ["To be, or not to be: that is the question."], n_tokens=300, seq_len=128)


# -- capture ------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_captured_x_is_the_output_of_the_norm_feeding_the_ffn(tiny_models, model_type):
    tiny = tiny_models[model_type]
    n_layers = tiny.model.config.num_hidden_layers
    outputs, handles = record_outputs([tiny.mlp_and_norm(i)[1] for i in range(n_layers)])
    input_ids = torch.randint(tiny.model.config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    try:
        captured = capture_ffn_inputs(tiny.model, tiny.family, input_ids, batch_size=2, progress=calls.append)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [1, 1, 1] and captured.n_tokens == 80
    assert sorted(captured.layers) == list(range(n_layers))
    for i, x in captured.layers.items():
        assert x.shape == (80, tiny.d_model) and x.dtype == torch.float32
        torch.testing.assert_close(x, torch.cat(outputs[i]), rtol=0, atol=1e-6)


def test_minilm_ffn_layer_on_captured_x_reproduces_the_model_ffn(minilm):
    checkpoint, model, _, input_ids = minilm
    blocks = model.encoder.layer
    hidden, h_handles = record_outputs([block.intermediate for block in blocks])  # act(w_in x + b_in)
    ffn_out, o_handles = record_outputs([block.output.dense for block in blocks])  # w_out a + b_out
    try:
        captured = capture_ffn_inputs(model, checkpoint.family.name, input_ids, batch_size=3)
    finally:
        for handle in h_handles + o_handles:
            handle.remove()
    assert len(captured.layers) == 6 and captured.n_tokens == 512
    for i, layer in enumerate(checkpoint.layers()):
        x = captured.layers[i]  # [512, 384]
        assert x.shape == (512, 384)
        torch.testing.assert_close(layer.hidden(x), torch.cat(hidden[i]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.forward(x), torch.cat(ffn_out[i]), rtol=1e-5, atol=1e-5)


def test_trained_lm_ffn_layer_on_captured_x_reproduces_the_model_ffn(tiny_lm):
    checkpoint, model, tokenizer = tiny_lm
    assert (checkpoint.family.name, checkpoint.d_model, checkpoint.d_ff, checkpoint.n_layers) == ("llama", 64, 256, 2)
    input_ids = heldout_windows(tokenizer)[:8]  # [8, 128]
    ffn_out, handles = record_outputs([block.mlp for block in model.model.layers])
    try:
        captured = capture_ffn_inputs(model, "llama", input_ids, batch_size=4)
    finally:
        for handle in handles:
            handle.remove()
    for i, layer in enumerate(checkpoint.layers()):
        torch.testing.assert_close(layer.forward(captured.layers[i]), torch.cat(ffn_out[i]), rtol=1e-5, atol=1e-5)


def test_trained_lm_predicts_held_out_shakespeare_far_better_than_any_unigram_model(tiny_lm):
    _, model, tokenizer = tiny_lm
    assert 512 <= len(tokenizer) <= 1024
    input_ids = heldout_windows(tokenizer)  # [64, 128]
    loss, unigram = heldout_loss(model, input_ids), unigram_entropy(input_ids)
    log.info("trained tiny LM: held-out loss %.3f nats, best unigram %.3f nats", loss, unigram)
    assert loss < unigram - 1.0


def test_gpt2_variant_of_the_trained_lm_loads_and_captures_conv1d_ffns(tmp_path):
    checkpoint = open_checkpoint(train_tiny_causal_lm(tmp_path / "gpt2", family="gpt2", steps=10))
    assert (checkpoint.family.name, checkpoint.d_model, checkpoint.d_ff, checkpoint.layout.activation) == ("gpt2", 64, 256, "gelu_tanh")
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    input_ids = tokenize_documents(tokenizer, ["Now is the winter of our discontent\n" * 40], 256, 64)  # [4, 64]
    ffn_out, handles = record_outputs([block.mlp for block in model.transformer.h])
    try:
        captured = capture_ffn_inputs(model, "gpt2", input_ids)
    finally:
        for handle in handles:
            handle.remove()
    for i, layer in enumerate(checkpoint.layers()):
        torch.testing.assert_close(layer.forward(captured.layers[i]), torch.cat(ffn_out[i]), rtol=1e-5, atol=1e-5)


def test_a_causal_lm_writes_seeded_calibration_windows_it_finds_likely(tiny_lm):
    _, model, _ = tiny_lm
    state = torch.random.get_rng_state()

    windows = generated_windows(model, "llama", 1000, seq_len=64, seed=3)

    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is left alone
    assert windows.shape == (16, 64)  # ⌈1000 / 64⌉ windows
    assert torch.equal(windows, generated_windows(model, "llama", 1000, seq_len=64, seed=3))
    assert not torch.equal(windows, generated_windows(model, "llama", 1000, seq_len=64, seed=4))
    noise = torch.randint(model.config.vocab_size, windows.shape, generator=torch.Generator().manual_seed(0))
    loss, noise_loss = heldout_loss(model, windows), heldout_loss(model, noise)
    log.info("tiny LM: %.2f nats on its own windows, %.2f on uniform token ids", loss, noise_loss)
    assert loss < noise_loss - 1.0  # the model's own text, not noise


def test_an_encoder_gets_uniform_token_windows_and_the_split_captures_them(minilm):
    checkpoint, model, tokenizer, _ = minilm
    split = calibration_split(model, tokenizer, "bert", 300, None, "generated", seed=1)

    assert split.name == "generated" and split.input_ids.shape == (3, 128)
    assert split.input_ids.max() < model.config.vocab_size and split.input_ids.unique().numel() > 300
    assert split.ffn_inputs.n_tokens == 384 and split.ffn_inputs.layers[0].shape == (384, checkpoint.d_model)
    with pytest.raises(MetanetError, match="calibration source must be one of text, generated"):
        calibration_split(model, tokenizer, "bert", 300, None, "random", seed=1)


def test_checkpoint_without_tokenizer_is_refused(tiny_models):
    with pytest.raises(MetanetError, match="needs a tokenizer in the checkpoint folder; data-free partition and predict work without"):
        load_model_and_tokenizer(open_checkpoint(tiny_models["llama"].path))


# -- neuron statistics --------------------------------------------------------------------
def test_gelu_stats_on_minilm_follow_the_top_fraction_definition(minilm):
    checkpoint, model, _, input_ids = minilm
    layer = checkpoint.layer(2)
    x = capture_ffn_inputs(model, "bert", input_ids).layers[2]  # [512, 384]
    stats = neuron_stats(layer, x, active_fraction=0.25, batch_tokens=100)
    assert stats.n_tokens == 512 and stats.activation_rate.shape == stats.mean_abs.shape == (1536,)
    assert 0 <= stats.activation_rate.min() and stats.activation_rate.max() <= 1
    assert stats.activation_rate.mean().item() == pytest.approx(384 / 1536, abs=1e-6)  # k = 384 of 1536 per token
    assert stats.activation_rate.std() > 0.05  # some neurons fire far more often than others
    a = layer.hidden(x).abs()
    torch.testing.assert_close(stats.mean_abs, a.mean(0), rtol=1e-5, atol=1e-6)
    c = stats.coactivation
    assert c.is_sparse and c.is_coalesced() and c.shape == (1536, 1536)
    dense = c.to_dense()
    torch.testing.assert_close(dense.diagonal(), stats.activation_rate * 512, rtol=0, atol=1e-3)
    assert torch.equal(dense, dense.T)
    assert (dense <= dense.diagonal()[:, None]).all()


def test_relu_stats_are_exact_counts_of_positive_activations(tiny_models):
    layer = open_checkpoint(tiny_models["opt"].path).layer(0)
    assert layer.activation == "relu"
    x = torch.randn(300, layer.d_model, generator=torch.Generator().manual_seed(0))
    stats = neuron_stats(layer, x, batch_tokens=64)
    m = (layer.hidden(x) > 0).float()  # [300, 96]
    torch.testing.assert_close(stats.activation_rate, m.mean(0))
    assert torch.equal(stats.coactivation.to_dense(), m.T @ m)


def test_sparse_sketch_keeps_exact_counts_of_each_neurons_top_partners(tiny_lm, monkeypatch):
    checkpoint, model, tokenizer = tiny_lm
    layer = checkpoint.layer(1)
    x = capture_ffn_inputs(model, "llama", heldout_windows(tokenizer)[:8]).layers[1]  # [1024, 64]
    dense = neuron_stats(layer, x, active_fraction=0.25).coactivation.to_dense()  # f = 256 ≤ limit: exact
    monkeypatch.setattr(stats_module, "DENSE_COACTIVATION_LIMIT", 100)  # 256 > 100: sketch, row blocks of 39
    keep = 8
    sketch = neuron_stats(layer, x, active_fraction=0.25, keep=keep).coactivation
    assert sketch.is_sparse and sketch.is_coalesced()
    assert sketch._nnz() < 256 * (2 * keep + 1) < dense.count_nonzero()
    rows, cols = sketch.indices()
    assert torch.equal(sketch.values(), dense[rows, cols])  # every stored count is exact
    kept = sketch.to_dense()
    assert torch.equal(kept, kept.T) and torch.equal(kept.diagonal(), dense.diagonal())
    off = lambda m: m - torch.diag(m.diagonal())  # noqa: E731
    assert torch.equal(off(kept).topk(keep, dim=1).values, off(dense).topk(keep, dim=1).values)


def test_stats_refuse_inputs_of_the_wrong_width(tiny_models):
    layer = open_checkpoint(tiny_models["llama"].path).layer(0)
    with pytest.raises(MetanetError, match=r"FFN inputs must be \[T, 32\]"):
        neuron_stats(layer, torch.zeros(10, 31))
    with pytest.raises(MetanetError, match="active_fraction"):
        neuron_stats(layer, torch.zeros(10, 32), active_fraction=0)
