"""Calibration (optional, see DESIGN.md): corpus, or windows the model writes itself → token windows → FFN inputs X → neuron statistics."""

from metanet.calib.capture import FFNInputs, capture_ffn_inputs, load_model_and_tokenizer
from metanet.calib.corpus import load_corpus, split_documents, tokenize_documents
from metanet.calib.generated import generated_windows
from metanet.calib.splits import CALIBRATION_SOURCES, TextSplit, calibration_split, calibration_windows, text_split
from metanet.calib.stats import DENSE_COACTIVATION_LIMIT, NeuronStats, active_mask, neuron_stats

__all__ = [
    "CALIBRATION_SOURCES", "DENSE_COACTIVATION_LIMIT", "FFNInputs", "NeuronStats", "TextSplit", "active_mask", "calibration_split", "calibration_windows",
    "capture_ffn_inputs", "generated_windows", "load_corpus", "load_model_and_tokenizer", "neuron_stats", "split_documents", "text_split",
    "tokenize_documents",
]
