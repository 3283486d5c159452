"""Prompt checkpoints: our safetensors format, the reference format, and their error messages."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from service.model import CheckpointError, build_model, import_reference, load_checkpoint, save_checkpoint
from service.model.checkpoint import PromptCheckpoint

from .paths import REF_PROMPTS


def test_reference_file_loads_only_trained_tensors(ref_checkpoint):
    ck = ref_checkpoint
    assert ck.ctx_pos.shape == (12, 64) and ck.ctx_neg.shape == (12, 64)
    assert ck.deep.shape == (8, 4, 64)
    sd = torch.load(REF_PROMPTS, weights_only=True)["prompt_learner"]
    assert torch.equal(ck.ctx_pos, sd["ctx_pos"][0, 0])
    assert torch.equal(ck.deep[7], sd["compound_prompts_text.7"])
    assert ck.layer_features == "final"


def test_import_round_trip_gives_identical_text_features(tmp_path, tiny_clip, ref_checkpoint):
    out = import_reference(REF_PROMPTS, tmp_path / "prompts")
    assert out.suffix == ".safetensors"
    with safe_open(str(out), "pt") as f:
        assert set(f.keys()) == {"ctx_pos", "ctx_neg", "deep"}
        meta = json.loads(f.metadata()["dhrclip"])
    assert meta["format"] == "dhrclip-prompts/1" and meta["depth"] == 9 and meta["n_ctx"] == 12
    assert meta["layer_features"] == "final" and meta["width"] == 64
    ours = load_checkpoint(tmp_path / "prompts")  # a directory means its newest checkpoint
    assert ours.path == str(out) and len(ours.sha256) == 64
    clip, _ = tiny_clip
    a, _ = build_model(clip, ref_checkpoint)
    b, info = build_model(clip, ours)
    assert torch.equal(a.text_features, b.text_features)
    assert info.prompts == out.stem and info.prompts_kind == "learned"


def test_layer_features_switch_is_read_from_checkpoint(tmp_path, tiny_clip, ref_checkpoint):
    ck = PromptCheckpoint(
        ref_checkpoint.ctx_pos, ref_checkpoint.ctx_neg, ref_checkpoint.deep, {"layer_features": "per_layer"}
    )
    path = save_checkpoint(ck, tmp_path / "per_layer.safetensors")
    model, info = build_model(tiny_clip[0], load_checkpoint(path))
    assert model.cfg.layer_features == "per_layer" and info.layer_features == "per_layer"


def test_wrong_width_names_key_and_shapes(tmp_path, tiny_clip):
    ck = PromptCheckpoint(torch.zeros(12, 768), torch.zeros(12, 768), torch.zeros(8, 4, 768))
    path = save_checkpoint(ck, tmp_path / "vitl.safetensors")
    with pytest.raises(CheckpointError, match=r"ctx_pos has shape \(12, 768\).*text width is 64"):
        build_model(tiny_clip[0], load_checkpoint(path))


def test_missing_keys_and_wrong_depth(tmp_path):
    sd = torch.load(REF_PROMPTS, weights_only=True)["prompt_learner"]
    no_ctx = {k: v for k, v in sd.items() if k != "ctx_neg"}
    torch.save({"prompt_learner": no_ctx}, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match="a.pth: missing key 'ctx_neg'"):
        load_checkpoint(tmp_path / "a.pth")
    gap = {k: v for k, v in sd.items() if k != "compound_prompts_text.3"}
    torch.save({"prompt_learner": gap}, tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match="missing key 'compound_prompts_text.3'"):
        load_checkpoint(tmp_path / "b.pth")
    from safetensors.torch import save_file

    bad = tmp_path / "c.safetensors"
    save_file(
        {"ctx_pos": torch.zeros(12, 64), "ctx_neg": torch.zeros(12, 64), "deep": torch.zeros(8, 4, 64)},
        str(bad),
        metadata={"dhrclip": json.dumps({"depth": 5})},
    )
    with pytest.raises(CheckpointError, match=r"metadata says depth 5 but 'deep' has shape \(8, 4, 64\)"):
        load_checkpoint(bad)
    save_file({"ctx_pos": torch.zeros(12, 64)}, str(tmp_path / "d.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor 'ctx_neg'"):
        load_checkpoint(tmp_path / "d.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "junk.pth").write_bytes(b"\x00junk")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "junk.pth")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad_json.safetensors", "{not json", "metadata 'dhrclip' is not JSON"),
        ("list_json.safetensors", "[1, 2]", "metadata 'dhrclip' must be a JSON object, got list"),
        ("int_values.pth", {"ctx_pos": 3, "ctx_neg": 4}, "'ctx_pos' is int, not a tensor"),
        ("scalars.pth", {"ctx_pos": torch.tensor(1.0), "ctx_neg": torch.tensor(1.0)}, r"'ctx_pos' has shape \(\)"),
        (
            "deep_int.pth",
            {"ctx_pos": torch.zeros(4, 8), "ctx_neg": torch.zeros(4, 8), "compound_prompts_text.0": 5},
            "'compound_prompts_text.0' is int, not a tensor",
        ),
    ],
)
def test_malformed_values_are_one_line_naming_the_file(tmp_path, name, content, message):
    """Odd metadata or non-tensor values were tracebacks (JSONDecodeError, AttributeError, IndexError)."""
    from safetensors.torch import save_file

    path = tmp_path / name
    if name.endswith(".safetensors"):
        tensors = {"ctx_pos": torch.zeros(4, 8), "ctx_neg": torch.zeros(4, 8), "deep": torch.zeros(1, 2, 8)}
        save_file(tensors, str(path), metadata={"dhrclip": content})
    else:
        torch.save({"prompt_learner": content}, path)
    with pytest.raises(CheckpointError, match=f"{name}: .*{message}"):
        load_checkpoint(path)


def test_a_depth_of_another_type_is_named_with_its_type(tmp_path):
    from safetensors.torch import save_file

    tensors = {"ctx_pos": torch.zeros(4, 8), "ctx_neg": torch.zeros(4, 8), "deep": torch.zeros(1, 2, 8)}
    save_file(tensors, str(tmp_path / "d.safetensors"), metadata={"dhrclip": json.dumps({"depth": "2"})})
    with pytest.raises(CheckpointError, match=r"metadata says depth '2' but"):
        load_checkpoint(tmp_path / "d.safetensors")


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    """--out a file was a FileExistsError traceback; a write failing half-way left ``<name>.tmp`` behind."""
    from service.cli import main
    from service.model import checkpoint

    (tmp_path / "a_file").write_text("x")
    assert main(["weights", "import", str(REF_PROMPTS), "--out", str(tmp_path / "a_file")]) == 2
    out = tmp_path / "a_file" / "prompt_learner_checkpoint.safetensors"
    assert capsys.readouterr().err == f"dhrclip weights: {out}: cannot write it (File exists)\n"

    def half_written(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", half_written)
    with pytest.raises(
        CheckpointError, match=r"prompt_learner_checkpoint.safetensors: cannot write it \(No space left on device\)"
    ):
        import_reference(REF_PROMPTS, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
