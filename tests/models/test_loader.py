"""The safetensors loader: sharded and bf16 checkpoints, tied embeddings, expert subsets, and a
clear CheckpointError (naming the file or tensor) for every broken checkpoint directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeserve.errors import CheckpointError
from moeserve.models import loader
from moeserve.models.loader import CheckpointReader, load_model

EXPERTS = "model.layers.{i}.block_sparse_moe.experts.{e}."


def _load(directory: Path, dtype: torch.dtype = torch.float32, **kwargs) -> torch.nn.Module:
    return load_model(directory, dtype, progress=False, **kwargs)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


@pytest.fixture(scope="module")
def mixtral_dir(make_checkpoint) -> Path:
    return make_checkpoint("mixtral", "mixtral")


@pytest.fixture(scope="module")
def mixtral(mixtral_dir) -> torch.nn.Module:
    return _load(mixtral_dir)


@pytest.fixture()
def broken(tmp_path, mixtral_dir) -> Path:
    """A private copy of the Mixtral checkpoint, for a test to damage."""
    return Path(shutil.copytree(mixtral_dir, tmp_path / "ckpt"))


def _rewrite(file: Path, edit) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


# --- checkpoints that load --------------------------------------------------------------------

def test_sharded_checkpoint_loads_like_single_file(make_checkpoint, mixtral) -> None:
    sharded = make_checkpoint("mixtral_sharded", "mixtral", max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 3
    ours = _state(_load(sharded))
    assert ours.keys() == _state(mixtral).keys()
    for name, param in _state(mixtral).items():
        assert torch.equal(ours[name], param), name


def test_bf16_checkpoint_loads_as_bf16_and_as_float32(make_checkpoint) -> None:
    directory = make_checkpoint("mixtral_bf16", "mixtral", dtype=torch.bfloat16)
    on_disk = load_file(directory / "model.safetensors")
    w1 = on_disk[EXPERTS.format(i=2, e=5) + "w1.weight"]
    assert w1.dtype == torch.bfloat16
    bf16 = _load(directory, torch.bfloat16, pack=False)   # plain tensors, to compare them
    fp32 = _load(directory, torch.float32, pack=False)
    assert bf16.cfg.dtype == "bfloat16"
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert torch.equal(bf16.layers[2].moe.experts.w13[5, : w1.shape[0]], w1)
    for (name, a), (_, b) in zip(bf16.named_parameters(), fp32.named_parameters()):
        assert torch.equal(a.float(), b), name     # float32 load is the exact upcast


def test_tied_embeddings_load_without_lm_head_tensor(make_checkpoint) -> None:
    directory = make_checkpoint("olmoe_tied", "olmoe", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(directory / "model.safetensors")
    model = _load(directory)
    assert model.lm_head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, load_file(directory / "model.safetensors")["model.embed_tokens.weight"])


def test_expert_subset_reads_only_owned_experts(mixtral_dir, mixtral, monkeypatch) -> None:
    read: list[str] = []
    original = CheckpointReader.get

    def recording_get(self, name):
        read.append(name)
        return original(self, name)

    monkeypatch.setattr(CheckpointReader, "get", recording_get)
    part = _load(mixtral_dir, first_expert=4, num_local_experts=4)
    for i, (ours, full) in enumerate(zip(part.layers, mixtral.layers)):
        assert ours.moe.experts.w13.shape[0] == 4
        assert torch.equal(ours.moe.experts.w13, full.moe.experts.w13[4:8]), i
        assert torch.equal(ours.moe.experts.w2, full.moe.experts.w2[4:8]), i
        assert torch.equal(ours.moe.router.weight, full.moe.router.weight), i   # router sees all experts
    expert_reads = [n for n in read if ".experts." in n]
    owned = {EXPERTS.format(i=i, e=e) + f"{w}.weight"
             for i in range(3) for e in range(4, 8) for w in ("w1", "w2", "w3")}
    assert set(expert_reads) == owned and len(expert_reads) == len(owned)    # each once, none of 0..3
    assert len(read) == len(set(read))
    assert part.expert_tokens.shape == (3, 8)      # counts stay global


# --- clear errors -----------------------------------------------------------------------------

def test_missing_config(broken) -> None:
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        _load(broken)


def test_unknown_architecture_lists_supported(broken) -> None:
    config = json.loads((broken / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (broken / "config.json").write_text(json.dumps(config))
    pattern = (r"config\.json: unsupported architecture \['LlamaForCausalLM'\]; "
               r"supported: .*MixtralForCausalLM.*OlmoeForCausalLM.*Qwen3MoeForCausalLM")
    with pytest.raises(CheckpointError, match=pattern):
        _load(broken)


def test_missing_tensor_is_named(broken) -> None:
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(broken / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is missing"):
        _load(broken)


def test_missing_expert_tensor_is_named(broken) -> None:
    name = EXPERTS.format(i=2, e=6) + "w3.weight"
    _rewrite(broken / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is missing"):
        _load(broken)


@pytest.mark.parametrize(("name", "shape", "pattern"), [
    ("model.layers.1.block_sparse_moe.gate.weight", (7, 64),
     r"layers\.1\.moe\.router\.weight has shape \(7, 64\), expected \(8, 64\)"),
    ("model.norm.weight", (65,), r"norm\.weight has shape \(65,\), expected \(64,\)"),
    ("model.layers.0.self_attn.k_proj.weight", (33, 64), r"layers\.0\.attn\.qkv\.weight has shape \(129, 64\)"),
    # Parts of one fused parameter (q/k/v, gate/up, stacked experts) whose other dims differ used to
    # escape as torch.cat / torch.stack RuntimeErrors.
    ("model.layers.1.self_attn.k_proj.weight", (32, 63),
     r"'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \(32, 63\)"),
    (EXPERTS.format(i=1, e=3) + "w2.weight", (64, 95), r"experts\.3\.w2\.weight' has shape \(64, 95\)"),
    (EXPERTS.format(i=0, e=2) + "w1.weight", (96, 60),
     r"experts\.2\.w3\.weight' has shape \(96, 64\).*experts\.2\.w1\.weight' with shape \(96, 60\)"),
])
def test_mis_shaped_tensor(broken, name: str, shape: tuple[int, ...], pattern: str) -> None:
    _rewrite(broken / "model.safetensors", lambda t: t.__setitem__(name, torch.zeros(shape)))
    with pytest.raises(CheckpointError, match=pattern):
        _load(broken)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.001])
def test_truncated_safetensors_names_the_file(broken, keep: float) -> None:
    file = broken / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=rf"{file}: unreadable safetensors file"):
        _load(broken)


def test_truncated_shard_names_the_shard(tmp_path, make_checkpoint) -> None:
    directory = Path(shutil.copytree(make_checkpoint("mixtral_sharded", "mixtral", max_shard_size="50KB"),
                                     tmp_path / "sharded"))
    shard = sorted(directory.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"{shard}: unreadable safetensors file"):
        _load(directory)


def test_pickle_only_directory_is_refused(broken) -> None:
    torch.save(load_file(broken / "model.safetensors"), broken / "pytorch_model.bin")
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors.*pytorch_model\.bin.*never loads pickle"):
        _load(broken)


def test_index_pointing_to_missing_shard(tmp_path, make_checkpoint) -> None:
    directory = Path(shutil.copytree(make_checkpoint("mixtral_sharded", "mixtral", max_shard_size="50KB"),
                                     tmp_path / "sharded"))
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    missing = directory / sorted(set(index["weight_map"].values()))[-1]
    missing.unlink()
    with pytest.raises(CheckpointError, match=rf"{missing}: listed in the index but the file does not exist"):
        _load(directory)


def test_invalid_index_json(broken) -> None:
    (broken / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not a valid safetensors index"):
        _load(broken)


def test_reader_closes_files_after_error(broken, monkeypatch) -> None:
    """A failed load must not leave safetensors handles open (they map the file)."""
    closed = []
    original = CheckpointReader.close

    def recording_close(self):
        closed.append(self.model_dir)
        original(self)

    monkeypatch.setattr(CheckpointReader, "close", recording_close)
    _rewrite(broken / "model.safetensors", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError):
        loader.load_model(broken, torch.float32, progress=False)
    assert closed == [broken]
