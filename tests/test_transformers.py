"""Transformers and recurrent models: the ``transformers`` model source, the ``text`` data source,
output-fitting verification metrics, the transformer optimizer and dynamic INT8 (LSTM included),
on small models built here (a 2-layer BertModel saved with save_pretrained, a tiny LSTM)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from accelc.build import build
from accelc.errors import DataError, VerificationError
from accelc.passes.dynamic_quantization import quantization_facts, quantize_dynamic_model
from accelc.passes.hf_sources import TextSource, TransformersSource
from accelc.passes.output_metrics import (
    compare_by_kind,
    compare_hidden_states,
    degenerate_reason,
    neighbor_recall,
)
from accelc.passes.verification import Verify
from accelc.signature import InputSignature

WORDS = ("the quick brown fox jumps over a lazy dog while cats sleep in warm sun and birds sing "
         "songs about rivers mountains trees clouds rain wind stone light dark").split()


def _tiny_bert_dir(root: Path, seed: int = 0, pooling: bool = True) -> Path:
    """A 2-layer BertModel with a word-level tokenizer.json and a sentence-transformers mean-pooling head."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import BertConfig, BertModel

    d = root / "tiny-bert"
    d.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(d / "tokenizer.json"))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).eval().save_pretrained(str(d), safe_serialization=True)
    if pooling:
        (d / "1_Pooling").mkdir(exist_ok=True)
        (d / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}))
        (d / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]))
    return d


def _sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(3, 12)))) for _ in range(n)]


SIGNATURE = InputSignature.from_json([
    {"name": n, "shape": [1, 16], "dtype": "int64",
     "dynamic": [{"axis": 0, "name": "batch", "min": 1, "max": 16}, {"axis": 1, "name": "sequence", "min": 1,
                                                                       "max": 32}]}
    for n in ("input_ids", "attention_mask", "token_type_ids")
])


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return _tiny_bert_dir(tmp_path_factory.mktemp("hf"))


def test_transformers_source_applies_the_models_own_pooling_head(bert_dir):
    src = TransformersSource()
    model = src.load({"source": "transformers", "path": str(bert_dir), "head": "auto"})
    assert model.output_kind == "embedding" and model.pooling == "mean" and model.normalize
    ids = torch.tensor([[2, 5, 6, 3, 0, 0], [2, 7, 8, 9, 10, 3]])
    mask = (ids != 0).long()
    with torch.inference_mode():
        emb = model(ids, mask, torch.zeros_like(ids))
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert emb.shape == (2, 32)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    manual = hidden[0, :4].mean(0)  # padded positions left out of the mean
    assert torch.allclose(emb[0], manual / manual.norm(), atol=1e-5)
    bare = src.load({"source": "transformers", "path": str(bert_dir), "head": "none"})
    assert bare.output_kind == "hidden_states"


def test_transformers_identity_follows_weights_and_config_not_the_path(bert_dir, tmp_path):
    src = TransformersSource()
    a = src.identity({"source": "transformers", "path": str(bert_dir)})
    other = _tiny_bert_dir(tmp_path, seed=1)
    b = src.identity({"source": "transformers", "path": str(other)})
    assert a["weights_sha256"] != b["weights_sha256"] and a["config_sha256"] == b["config_sha256"]
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(bert_dir, moved)
    assert src.identity({"source": "transformers", "path": str(moved)}) == a


def test_text_source_produces_every_input_with_padding_and_truncation(bert_dir, tmp_path):
    text = tmp_path / "s.txt"
    text.write_text("the quick brown fox\n\nbirds sing songs about rivers mountains trees clouds rain wind\n")
    src = TextSource()
    opts = {"text": str(text), "tokenizer": {"path": str(bert_dir)}, "max_length": 8, "padding": "longest"}
    out = src.load(opts, SIGNATURE)
    assert set(out) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(a.dtype == np.int64 and a.shape == (2, 8) for a in out.values())
    assert out["input_ids"][0].tolist() == [2, 4, 5, 6, 7, 3, 0, 0]
    assert out["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    assert out["attention_mask"][1].sum() == 8 and src.last_stats["truncated"] == 1
    fixed = src.load({**opts, "padding": "max_length", "max_length": 20}, SIGNATURE)
    assert fixed["input_ids"].shape == (2, 20)
    with pytest.raises(DataError, match="outside input 'input_ids' sequence range"):
        src.load({**opts, "padding": "max_length", "max_length": 40}, SIGNATURE)
    ident = src.identity(opts)
    (bert_dir / "tokenizer2.json").write_text((bert_dir / "tokenizer.json").read_text().replace("fox", "cat"))
    assert src.identity({**opts, "tokenizer": {"path": str(bert_dir / "tokenizer2.json")}}) != ident


def test_neighbor_recall_and_cosine_fit_embeddings():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((40, 16))
    m = compare_by_kind(ref, ref.copy(), "embedding")
    assert m["cosine"] == pytest.approx(1.0) and m["neighbor_recall"] == 1.0 and "top1_agreement" not in m
    shuffled = ref[rng.permutation(40)]
    assert neighbor_recall(ref, shuffled, 5) < 0.5
    noisy = ref + 0.3 * rng.standard_normal(ref.shape)
    m2 = compare_by_kind(ref, noisy, "embedding")
    assert 0.5 < m2["neighbor_recall"] < 1.0 and m2["cosine_min"] < m2["cosine"] < 1.0


def test_hidden_state_metrics_ignore_padded_positions():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((6, 5, 8))
    mask = np.ones((6, 5), np.int64)
    mask[:, 3:] = 0
    out = ref.copy()
    out[:, 3:] = 1e3  # garbage where the mask says padding
    m = compare_hidden_states(ref, out, mask)
    assert m["cosine"] == pytest.approx(1.0) and m["max_abs_error"] == 0.0 and m["tokens"] == 18
    assert compare_hidden_states(ref, out, None)["cosine"] < 0.9


def test_constant_reference_fails_verification_unless_the_recipe_says_warn():
    const = np.zeros((8, 10), np.float32)
    m = compare_by_kind(const, const.copy(), "classes")
    assert m["top1_agreement"] == 1.0 and "all zeros" in m["degenerate_reference"]
    same = np.tile(np.arange(10, dtype=np.float32), (8, 1))
    assert "same output for every sample" in degenerate_reason(same)
    assert degenerate_reason(np.random.default_rng(0).standard_normal((8, 10))) is None
    with pytest.raises(VerificationError, match="reference cannot judge"):
        Verify().check(m, {"tolerances": {"top1_agreement": 0.9}})
    Verify().check(m, {"tolerances": {"top1_agreement": 0.9}, "degenerate": "warn"})


class TinyLSTM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(16, 32, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y[:, -1])


def test_lstm_nodes_become_dynamic_quantize_lstm(tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "lstm.onnx"
    torch.onnx.export(TinyLSTM().eval(), (torch.randn(2, 7, 16),), str(src), input_names=["x"], dynamo=False,
                      dynamic_axes={"x": {0: "batch", 1: "time"}}, opset_version=17)
    float_model = onnx.load(str(src))
    assert sum(n.op_type == "LSTM" for n in float_model.graph.node) >= 1
    out = quantize_dynamic_model(src, tmp_path / "q.onnx", {"op_types": ["LSTM", "MatMul", "Gemm"]}, [])
    q = onnx.load(str(out))
    facts = quantization_facts(float_model, q, ["LSTM", "MatMul", "Gemm"])
    assert facts["quantized"].get("DynamicQuantizeLSTM") == sum(n.op_type == "LSTM" for n in float_model.graph.node)
    assert "LSTM" not in facts["float_remaining"]
    assert any("Gemm" in note for note in facts["not_quantized"])
    left_float = quantization_facts(float_model, onnx.load(str(
        quantize_dynamic_model(src, tmp_path / "q2.onnx", {"op_types": ["LSTM"]}, [n.name for n in
                               float_model.graph.node if n.op_type == "LSTM"]))), ["LSTM"])
    assert left_float["not_quantized"] and "LSTM node(s) stayed float" in left_float["not_quantized"][0]


def _recipe(tmp: Path, bert: Path, **over) -> Path:
    (tmp / "cal.txt").write_text("\n".join(_sentences(24, 0)))
    (tmp / "val.txt").write_text("\n".join(_sentences(24, 1)))
    inputs = [{"name": n, "shape": [1, 16], "dtype": "int64",
               "dynamic": [{"axis": 0, "name": "batch", "min": 1, "opt": 1, "max": 16},
                           {"axis": 1, "name": "sequence", "min": 1, "opt": 16, "max": 32}]}
              for n in ("input_ids", "attention_mask", "token_type_ids")]
    tok = {"path": str(bert / "tokenizer.json")}
    r = {
        "name": "tiny_bert",
        "model": {"source": "transformers", "path": str(bert)},
        "inputs": inputs,
        "target": "cpu",
        "precision": "int8",
        "data": {"calibration": {"source": "text", "text": "cal.txt", "tokenizer": dict(tok), "max_length": 32},
                 "validation": {"source": "text", "text": "val.txt", "tokenizer": dict(tok), "max_length": 32}},
        "verify": {"tolerances": {"cosine": 0.95}},
        "benchmark": {"batch_sizes": [1], "sequence_lengths": [8], "warmup": 1, "iterations": 2},
        **over,
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def test_tiny_bert_builds_with_dynamic_int8_and_embedding_metrics(bert_dir, tmp_path):
    res = build(_recipe(tmp_path, bert_dir), out_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert res.ok, res.result.failure
    stages = {s["node"]: s for s in res.report["stages"]}
    # the cpu target's transformer INT8 pipeline: the unfused export, dynamically quantized
    assert [s["pass"] for s in res.report["stages"] if s["pass"] in ("export_onnx", "quantize_dynamic")] \
        == ["export_onnx", "quantize_dynamic"] and "optimize_transformer" not in stages
    q = stages["quantize_dynamic"]["metrics"]
    # Q, K, V, attention output and the two feed-forward MatMuls of each of the 2 layers
    assert q["quantized"] == {"MatMulInteger": 12} and q["float_remaining"] == {}
    oc = q["outlier_channels"]
    assert oc["threshold"] == 3 and oc["min_gain"] == 1 and oc["of"] == 12
    assert oc["samples"] == 24  # statistics from data.calibration
    assert len(oc.get("float_matmuls", [])) == oc["decomposed"]
    v = stages["verify[quantize_dynamic]"]["metrics"]
    assert v["output_kind"] == "embedding" and "top1_agreement" not in v
    assert 0.9 < v["cosine"] <= 1.0 and 0 <= v["neighbor_recall"] <= 1 and v["recall_k"] == 5
    b = stages["benchmark"]["metrics"]
    assert b["sequence"] == 16 and b["batch_sequence"]["1x8"]["sequence"] == 8
    md = (tmp_path / "out" / "report.md").read_text()
    # an embedding has no top-1: the tables show only what was measured
    assert "top-1 agreement" not in md and "| None |" not in md and "neighbour recall@5" in md


def test_tiny_bert_fused_by_the_transformer_optimizer_quantizes_attention(bert_dir, tmp_path):
    passes = [{"export_onnx": {"dynamo": False}}, "optimize_transformer",
              {"quantize_dynamic": {"op_types": ["MatMul", "Attention"]}}]
    res = build(_recipe(tmp_path, bert_dir, passes=passes), out_dir=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert res.ok, res.result.failure
    stages = {s["node"]: s for s in res.report["stages"]}
    opt = stages["optimize_transformer"]["metrics"]
    assert opt["num_heads"] == 4 and opt["hidden_size"] == 32  # read from the model's config.json
    assert opt["fusions"].get("Attention") == 2 and opt["fusions"].get("BiasGelu") == 2
    assert opt["nodes"] < opt["nodes_before"]
    q = stages["quantize_dynamic"]["metrics"]
    # each fused Attention becomes one QAttention; the 3 other weight MatMuls per layer become MatMulInteger
    assert q["quantized"] == {"QAttention": 2, "MatMulInteger": 6} and q["float_remaining"] == {}


def test_fallback_search_finds_the_smallest_passing_count_in_few_trials():
    from accelc.passes.dynamic_quantization import search_count

    for need in range(1, 13):
        tried: list[int] = []
        found = search_count(12, lambda k, need=need, tried=tried: tried.append(k) or k >= need)
        assert found == need and len(tried) <= 7, (need, tried)  # linear search: up to 12
    assert search_count(12, lambda k: False) is None and search_count(0, lambda k: True) is None


def test_shipped_minilm_recipe_tokenises_its_disjoint_sentence_sets_with_the_models_tokenizer():
    from builders import REPO

    from accelc.graph import lower
    from accelc.recipe import load_recipe
    from accelc.registry import default_registry

    reg = default_registry()
    recipe = load_recipe(REPO / "recipes" / "minilm_cpu_int8.yaml", reg)
    graph = lower(recipe, reg)
    assert [n.pass_name for n in graph.nodes if n.pass_name in ("export_onnx", "quantize_dynamic")] == [
        "export_onnx", "quantize_dynamic"]
    q = next(n for n in graph.nodes if n.pass_name == "quantize_dynamic")
    assert "calibration" in q.inputs  # the outlier channels are found on the calibration sentences
    cal = recipe.data["calibration"]
    val = recipe.data["validation"]
    assert not set(Path(cal["text"]).read_text().splitlines()) & set(Path(val["text"]).read_text().splitlines())
    src = TextSource()
    arrays = src.load(val, recipe.signature)
    assert set(arrays) == {"input_ids", "attention_mask", "token_type_ids"} and len(arrays["input_ids"]) == 256
    assert arrays["input_ids"][:, 0].tolist() == [101] * 256  # [CLS] of the real uncased BERT vocabulary
    ident = TransformersSource().identity(recipe.model)
    assert ident["head"] == {"pooling": "mean", "normalize": True}


def test_facts_count_weight_matmuls_only_and_name_what_stayed_float(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="weight_mm"),
             helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["h", "ht"], ["y"], name="activation_mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    q = onnx.load(str(quantize_dynamic_model(src, tmp_path / "q.onnx", {"op_types": ["MatMul"]}, [])))
    facts = quantization_facts(model, q, ["MatMul"])
    assert facts["quantized"] == {"MatMulInteger": 1} and facts["float_remaining"] == {}
    kept = onnx.load(str(quantize_dynamic_model(src, tmp_path / "k.onnx", {"op_types": ["MatMul"]}, ["weight_mm"])))
    assert quantization_facts(model, kept, ["MatMul"])["not_quantized"] == ["1 of 1 MatMul node(s) stayed float"]


def test_nonfinite_embedding_and_hidden_state_samples_are_counted_and_fail():
    from accelc.tolerances import tolerance_failures

    rng = np.random.default_rng(2)
    ref = rng.standard_normal((10, 8))
    out = ref.copy()
    out[3, 0] = np.nan
    m = compare_by_kind(ref, out, "embedding")
    assert m["nonfinite_samples"] == 1 and m["reference_nonfinite_samples"] == 0 and m["samples"] == 10
    assert m["cosine"] == pytest.approx(1.0)  # over the finite samples; the NaN one is not an agreement
    fails = tolerance_failures(m, {"cosine": 0.99})
    assert fails and "non-finite" in fails[0]
    gone = compare_by_kind(ref, np.full_like(ref, np.inf), "embedding")
    assert gone["neighbor_recall"] is None and gone["nonfinite_samples"] == 10
    assert len(tolerance_failures(gone, {"neighbor_recall": 0.9})) == 2  # the count, and the missing metric
    hidden = rng.standard_normal((4, 5, 6))
    mask = np.ones((4, 5), np.int64)
    mask[:, 4] = 0
    noisy = hidden.copy()
    noisy[0, 4] = np.nan  # padding: masked, so not a failure
    assert compare_by_kind(hidden, noisy, "hidden_states", mask=mask)["nonfinite_samples"] == 0
    noisy[1, 1] = np.nan  # a real token
    assert compare_by_kind(hidden, noisy, "hidden_states", mask=mask)["nonfinite_samples"] == 1


def test_the_transformers_plugin_registers_the_sources_and_onnxruntime_runs_dynamic_int8(monkeypatch):
    from accelc.plugins.manager import make_plugin_manager
    from accelc.registry import build_registry, default_registry

    reg = default_registry()
    assert isinstance(reg.model_sources["transformers"], TransformersSource)
    assert isinstance(reg.data_sources["text"], TextSource)
    assert reg.kinds["onnx.dynamic"].runnable and reg.passes["quantize_dynamic"].produces == "onnx.dynamic"
    assert "onnx.dynamic" in reg.runtimes["onnxruntime"].kinds and "onnx.dynamic" in reg.runners
    monkeypatch.setenv("ACCELC_DISABLE_PLUGINS", "accelc.plugins.transformers")
    without = build_registry(make_plugin_manager(load_entry_points=False))
    assert "transformers" not in without.model_sources and "text" not in without.data_sources
    assert "optimize_transformer" in without.passes  # an ONNX Runtime pass: its plugin is still loaded


def test_recipe_comparison_settings_reach_verify_and_the_dynamic_int8_fallback(bert_dir, tmp_path):
    from accelc.errors import GraphError
    from accelc.graph import lower
    from accelc.recipe import load_recipe
    from accelc.registry import default_registry

    reg = default_registry()
    passes = [{"export_onnx": {"dynamo": False}}, "optimize_transformer", {"quantize_dynamic": {"fallback": "auto"}}]
    verify = {"after": ["quantize_dynamic"], "tolerances": {"cosine": 0.95}, "recall_k": 3, "degenerate": "warn",
              "output": "embedding", "stages": {"quantize_dynamic": {"neighbor_recall": 0.9}}}
    graph = lower(load_recipe(_recipe(tmp_path, bert_dir, passes=passes, verify=verify), reg), reg)
    v = graph.by_id["verify[quantize_dynamic]"].options
    assert (v["recall_k"], v["degenerate"], v["output"]) == (3, "warn", "embedding")
    assert v["tolerances"] == {"cosine": 0.95, "neighbor_recall": 0.9}
    q = graph.by_id["quantize_dynamic"].options
    assert q["tolerances"] == {"cosine": 0.95, "neighbor_recall": 0.9} and (q["recall_k"], q["output"]) == (
        3, "embedding")
    # an explicit verify step (no stage verified by lowering): the recipe's settings, its own winning
    explicit = [*passes[:2], {"quantize_dynamic": {"fallback": "auto", "tolerances": {"cosine": 0.9}}},
                {"verify": {"degenerate": "fail"}}]
    e = lower(load_recipe(_recipe(tmp_path, bert_dir, passes=explicit, verify=verify), reg), reg).by_id["verify"]
    assert (e.options["recall_k"], e.options["degenerate"], e.options["tolerances"]) == (3, "fail", {"cosine": 0.95})
    unverified = {"after": ["optimize_transformer"], "tolerances": {"cosine": 0.95}}
    with pytest.raises(GraphError, match="quantize_dynamic.fallback 'auto' needs tolerances"):
        lower(load_recipe(_recipe(tmp_path, bert_dir, passes=passes, verify=unverified), reg), reg)
