"""The expert-load grid and the partition picture: valid PNGs, and logged by `metanet eval`."""

from pathlib import Path

import mlflow
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from metanet.eval.plots import plot_expert_load_by_layer, plot_layer_partition, plot_speedup

runner = CliRunner()


def assert_picture(path, min_width=600):
    """A PNG that decodes, is at least `min_width` pixels wide, and shows more than a few colours."""
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_width and image.height >= 300, image.size
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50
    assert path.stat().st_size > 10_000


def test_expert_load_grid_and_partition_picture_are_pngs(tmp_path):
    generator = torch.Generator().manual_seed(0)
    layers = [{"index": i, "expert_load": torch.randint(0, 500, (8,), generator=generator).tolist(), "load_cv": 0.4} for i in range(4)]
    assert_picture(plot_expert_load_by_layer(layers, tmp_path / "load.png", shared=2))  # 4 panels on a 3-wide grid

    assign = torch.randperm(256, generator=generator) % 8
    rate = torch.rand(256, generator=generator)
    picture = plot_layer_partition(assign, rate, tmp_path / "partition.png", shared=1)
    assert_picture(picture, min_width=1000)


def test_speedup_plot_draws_the_cuda_graph_line_only_where_graph_timings_exist(tmp_path):
    rows = [{"tokens": t, "speedup": s, "paths": {"decode": 8}} for t, s in ((1, 2.1), (4, 1.8), (64, 1.1))]
    graphed = [row | {"graph_speedup": row["speedup"] + 1.0} for row in rows[:2]] + rows[2:]  # CUDA, T ≤ 16

    def orange_pixels(path) -> int:  # tab:orange, the graph line's colour
        with Image.open(path) as image:
            return sum(n for n, (r, g, b) in image.convert("RGB").getcolors(maxcolors=1 << 20) if r > 230 and 100 < g < 150 and b < 50)

    eager_only, with_graphs = plot_speedup(rows, tmp_path / "eager.png"), plot_speedup(graphed, tmp_path / "graphs.png")
    assert_picture(eager_only)
    assert_picture(with_graphs)
    assert orange_pixels(eager_only) == 0 and orange_pixels(with_graphs) > 100


def test_eval_logs_both_plots_to_its_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the sqlite store keeps artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    part = tmp_path / "part"
    result = runner.invoke(app, ["partition", "all-MiniLM-L6-v2", "--method", "random", "--shared", "1", "--out", str(part), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", "all-MiniLM-L6-v2", str(part), "--heldout-tokens", "256", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("eval").experiment_id])
    assert run.info.run_id in result.stdout
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"expert_load_by_layer.png", "partition_layer3.png"}  # MiniLM: 6 layers, the middle one is 3
    for name in names:
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=name, dst_path=str(tmp_path / "download"), tracking_uri=uri)
        assert_picture(Path(local))
