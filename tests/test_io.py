"""Model IO: formats, compatibility errors, in-place merging, atomic export that reloads."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evoopt.merge.merger import Merger
from evoopt.merge.recipe import RecipeError, parse_recipe
from evoopt.models.io import ModelSourceError, atomic_folder, check_compatible, open_source, resolve_path
from tests.helpers.models import save_family, tiny_llama_config


def _recipe(paths: list[Path], method: str = "ties", **params: object) -> object:
    base, *experts = paths
    per_model = {"weight": 0.5, "density": 0.6} if method != "task_arithmetic" else {"weight": 0.5}
    return parse_recipe({
        "method": method, "base": str(base),
        "models": [{"model": str(e), "parameters": per_model} for e in experts],
        "parameters": params,
    })


def test_formats_read_the_same_tensors(llama_family: list[Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_family[1])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    reference = open_source(llama_family[1])
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    single = llama_family[1] / "model.safetensors"
    for path in (tmp_path / "sharded", tmp_path / "bin", single):
        source = open_source(path)
        assert sorted(source.keys()) == sorted(reference.keys()), path
        for name in reference.keys():
            assert torch.equal(source.get(name), reference.get(name)), (path, name)


def test_a_folder_is_read_as_transformers_reads_it(llama_family: list[Path], tmp_path: Path) -> None:
    """The files from_pretrained loads, and only those: every *.safetensors was read before, a name in two files
    taken from the later one (an EMA copy beside the model was merged), and shards were read beside a full file."""
    from transformers import AutoModelForCausalLM

    model_file = llama_family[1] / "model.safetensors"
    state = load_file(model_file)
    other = {name: torch.full_like(t, 7.0) for name, t in state.items()}

    def expected(folder: Path) -> dict[str, torch.Tensor]:
        return dict(AutoModelForCausalLM.from_pretrained(folder).state_dict())

    def read(folder: Path) -> dict[str, torch.Tensor]:
        source = open_source(folder)
        return {name: source.get(name) for name in source.keys()}

    beside = tmp_path / "ema"  # the model and an EMA copy of it
    shutil.copytree(llama_family[1], beside)
    save_file(other, beside / "zz_model_ema.safetensors", metadata={"format": "pt"})
    # an index with shards beside the full file: from_pretrained takes the full file
    AutoModelForCausalLM.from_pretrained(llama_family[2]).save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    both = tmp_path / "both"
    shutil.copytree(tmp_path / "sharded", both)
    shutil.copy2(model_file, both / "model.safetensors")
    for folder in (beside, both):
        read_here, loaded = read(folder), expected(folder)
        for name, tensor in read_here.items():
            if name in loaded:
                assert torch.equal(tensor, loaded[name]), (folder, name)
        assert torch.equal(read_here["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    # with an index, each tensor from the file it names (a stray copy in another shard is not the model's)
    stray = tmp_path / "sharded"
    shard = sorted(stray.glob("model-*.safetensors"))[0]
    index = json.loads((stray / "model.safetensors.index.json").read_text())
    name = next(n for n, f in index["weight_map"].items() if f != shard.name)
    save_file({**load_file(shard), name: torch.full_like(state[name], 7.0)}, shard, metadata={"format": "pt"})
    assert torch.equal(read(stray)[name], expected(stray)[name])
    del index["weight_map"][name]  # an index that names a tensor no shard holds is refused
    index["weight_map"]["model.missing"] = shard.name
    (stray / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelSourceError, match=r"index names 1 tensor\(s\) its shards lack \('model.missing'"):
        open_source(stray)
    shards = tmp_path / "unindexed"  # shards without an index that both hold a tensor: which is the model
    shards.mkdir()
    save_file(state, shards / "a.safetensors")
    save_file({"model.norm.weight": state["model.norm.weight"]}, shards / "b.safetensors")
    with pytest.raises(ModelSourceError, match="tensor 'model.norm.weight' is in both a.safetensors and "
                                               "b.safetensors"):
        open_source(shards)
    # pytorch_model.bin beside a stray *.safetensors: from_pretrained loads the .bin, and so does evoopt
    binary = tmp_path / "binary"
    AutoModelForCausalLM.from_pretrained(llama_family[1]).save_pretrained(binary, safe_serialization=False)
    save_file(other, binary / "extra.safetensors", metadata={"format": "pt"})
    assert torch.equal(read(binary)["model.norm.weight"], expected(binary)["model.norm.weight"])
    # a model's identity is its weight files': a Trainer checkpoint's optimizer state beside it is not the model
    from evoopt.models.io import model_digest, model_fingerprint

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(llama_family[1], checkpoint)
    before = model_fingerprint(checkpoint), model_digest(checkpoint)
    torch.save({"step": 1}, checkpoint / "optimizer.pt")
    (checkpoint / "training_args.bin").write_bytes(b"args")
    assert (model_fingerprint(checkpoint), model_digest(checkpoint)) == before
    # the digest keys the expert cache: its formula is pinned (files by name, then each one's sha256), or every
    # cached expert would be trained again
    import hashlib

    named = sorted(f for f in checkpoint.iterdir() if f.name in ("model.safetensors", "config.json")
                   or f.name.startswith(("tokenizer", "special_tokens")))
    pinned = [[f.name, hashlib.sha256(f.read_bytes()).hexdigest()] for f in named]
    assert model_digest(checkpoint) == hashlib.sha256(json.dumps(pinned).encode()).hexdigest()
    legacy = tmp_path / "legacy.bin"  # torch's pre-zip format cannot be memory-mapped: read it whole
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(open_source(legacy).get("model.norm.weight"), state["model.norm.weight"])


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="no such file"):
        open_source(tmp_path / "nope")


def test_folder_without_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="no model weights found"):
        open_source(tmp_path)


def test_checkpoints_that_are_no_state_dict_and_bad_indexes_are_named(tmp_path: Path) -> None:
    """Each was a raw AttributeError, KeyError or JSONDecodeError; several GGUF files, one taken silently."""
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 1}, tmp_path / "x.pt")
    with pytest.raises(ModelSourceError, match=r"x.pt: not a state dict of tensors \(it holds 'state_dict' \(dict\), "
                                               r"'epoch' \(int\)\); save the model's state_dict\(\) itself"):
        open_source(tmp_path / "x.pt")
    for text in ("{}", "{not json", '{"weight_map": 3}'):
        folder = tmp_path / f"index-{len(text)}"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors.index.json").write_text(text)
        with pytest.raises(ModelSourceError, match="model.safetensors.index.json: not a safetensors index with a "
                                                   "weight_map"):
            open_source(folder)
    quantised = tmp_path / "gguf"
    quantised.mkdir()
    for name in ("m.Q4_K_M.gguf", "m.Q8_0.gguf"):
        (quantised / name).write_bytes(b"GGUF")
    with pytest.raises(ModelSourceError, match=r"holds 2 GGUF files \(m.Q4_K_M.gguf, m.Q8_0.gguf\); name the file"):
        open_source(quantised)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_are_refused(llama_family: list[Path], tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(llama_family[1], folder)
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(ModelSourceError, match="truncated or corrupt"):
        open_source(folder)


def test_every_safetensors_dtype_reads_as_itself(tmp_path: Path) -> None:
    """Float8, unsigned and complex tensors keep their dtype, shape and bytes through dtype(), get() and mapped()
    (an unmapped dtype was once read as float32: mapped() reinterpreted 16 float8 bytes as 4 floats)."""
    state = {
        "f8_e4m3": torch.linspace(-2, 2, 16).reshape(4, 4).to(torch.float8_e4m3fn),
        "f8_e5m2": torch.linspace(-2, 2, 6).to(torch.float8_e5m2),
        "u16": torch.arange(8, dtype=torch.int32).to(torch.uint16),
        "u32": torch.arange(5, dtype=torch.int64).to(torch.uint32),
        "u64": torch.arange(3, dtype=torch.int64).to(torch.uint64),
        "c64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        "f32": torch.randn(3),
    }
    save_file(state, tmp_path / "model.safetensors")
    source = open_source(tmp_path / "model.safetensors")
    for name, tensor in state.items():
        assert source.dtype(name) == tensor.dtype, name
        mapped, read = source.mapped(name), source.get(name)  # get() checks that the float8 values are finite
        assert mapped is not None and mapped.dtype == read.dtype == tensor.dtype, name
        assert torch.equal(mapped.view(torch.uint8), tensor.flatten().view(torch.uint8)), name
        assert torch.equal(read.view(torch.uint8), tensor.view(torch.uint8)), name


def test_an_unknown_safetensors_dtype_is_named(tmp_path: Path) -> None:
    # float4 is packed two values a byte: its header shape counts values, so no torch view of its bytes is right
    file = tmp_path / "model.safetensors"
    save_file({"ok": torch.ones(2), "packed": torch.zeros(4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}, file)
    with pytest.raises(ModelSourceError, match=r"model\.safetensors: tensor 'packed' has dtype F4.*Convert"):
        open_source(file)


def test_nan_weights_are_named(llama_family: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "nan"
    shutil.copytree(llama_family[1], folder)
    state = load_file(folder / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelSourceError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*NaN"):
        Merger(_recipe([llama_family[0], folder, llama_family[2]]))


def test_shape_and_vocabulary_mismatches_list_tensors(llama_family: list[Path], tmp_path: Path) -> None:
    wide = save_family(tmp_path / "wide", tiny_llama_config(intermediate_size=48), experts=0, seed=5)[0]
    vocab = save_family(tmp_path / "vocab", tiny_llama_config(vocab_size=99), experts=0, seed=5)[0]
    with pytest.raises(ModelSourceError) as error:
        Merger(_recipe([llama_family[0], wide, vocab]))
    text = str(error.value)
    assert "model.layers.0.mlp.up_proj.weight" in text and "[64, 32]" in text and "[48, 32]" in text
    assert "vocabulary sizes differ" in text and "96 rows" in text and "99" in text


def test_source_tensors_the_base_lacks_are_named(llama_family: list[Path], tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """An expert with a fine-tuned head that the base has not: no merge reads it, and the log says so, once per
    source, unless the recipe excludes it. Integer tensors (no weights) are not named."""
    import logging

    folder = tmp_path / "headed"
    shutil.copytree(llama_family[1], folder)
    state = load_file(folder / "model.safetensors")
    state.update({"score.weight": torch.ones(3, 32), "score.bias": torch.zeros(3), "ids": torch.arange(3)})
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="evoopt.merge.merger"):
        Merger(_recipe([llama_family[0], folder, llama_family[2]]))
    warned = [r.getMessage() for r in caplog.records if "lacks" in r.getMessage()]
    assert warned == ["merge: models[0] has 2 floating-point tensors that base lacks: 'score.bias', 'score.weight'; "
                      "no merge reads them and the merged model has none (list them in the recipe's exclude to say "
                      "so and silence this)"]
    caplog.clear()
    recipe = _recipe([llama_family[0], folder, llama_family[2]])
    recipe.exclude = ["score.*"]  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="evoopt.merge.merger"):
        Merger(recipe)
    assert not [r for r in caplog.records if "lacks" in r.getMessage()]


def test_architecture_mismatch(llama_family: list[Path], bert_family: list[Path]) -> None:
    sources = {"a": open_source(llama_family[0]), "b": open_source(bert_family[0])}
    with pytest.raises(ModelSourceError, match="architectures differ"):
        check_compatible(sources, [])


def test_merge_writes_in_place_and_export_reloads(llama_family: list[Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    merger = Merger(_recipe(llama_family))
    params_before = {n: p.data_ptr() for n, p in merger.model.named_parameters()}
    merger.merge()
    first = {n: p.detach().clone() for n, p in merger.model.named_parameters()}
    merger.merge(_recipe(llama_family, scale=0.3))
    assert params_before == {n: p.data_ptr() for n, p in merger.model.named_parameters()}
    assert any(not torch.equal(first[n], p) for n, p in merger.model.named_parameters())

    ids = torch.arange(0, 40).reshape(2, 20) % 96
    expected = merger.model(ids).logits
    out = merger.export(tmp_path / "merged")
    assert {"config.json", "model.safetensors", "README.md", "evoopt_recipe.yaml"} <= {p.name for p in out.iterdir()}
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)
    assert "ties" in (out / "README.md").read_text()
    assert parse_recipe(__import__("yaml").safe_load((out / "evoopt_recipe.yaml").read_text())).method == "ties"
    # the tokenizer's files go with it, a chat template saved apart (older saves) and Mistral's among them
    base = tmp_path / "base"
    shutil.copytree(llama_family[0], base)
    for name in ("chat_template.json", "tekken.json"):
        (base / name).write_text('{"chat_template": "{{ messages }}"}')
    out = Merger(_recipe([base, *llama_family[1:]])).export(tmp_path / "with-template")
    assert (out / "chat_template.json").read_text() == (base / "chat_template.json").read_text()
    assert (out / "tekken.json").exists()


def test_tied_embeddings_export(tied_llama_family: list[Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    merger = Merger(_recipe(tied_llama_family, method="task_arithmetic"))
    assert "lm_head.weight" not in merger.targets
    model = merger.merge()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    out = merger.export(tmp_path / "tied")
    ids = torch.arange(10).unsqueeze(0)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_excluding_one_name_of_tied_weights_keeps_both_from_the_base(tied_llama_family: list[Path],
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The tied pair is one target, under the embeddings' name: excluding lm_head.weight merged it anyway."""
    from safetensors.torch import load_file

    base = load_file(str(tied_llama_family[0] / "model.safetensors"))["model.embed_tokens.weight"]
    for pattern in ("lm_head.weight", "model.embed_tokens.*"):
        recipe = _recipe(tied_llama_family, method="task_arithmetic")
        recipe.exclude = [pattern]
        with caplog.at_level("WARNING", logger="evoopt.merge.merger"):
            merger = Merger(recipe)
        assert "model.embed_tokens.weight" not in merger.targets
        assert "(tied weights): both are kept from the base" in caplog.text
        model = merger.merge()
        assert torch.equal(model.lm_head.weight, base) and torch.equal(model.model.embed_tokens.weight, base)
        caplog.clear()


def test_task_arithmetic_merge_matches_pure_function(llama_family: list[Path]) -> None:
    from evoopt.merge import ties

    merger = Merger(_recipe(llama_family))
    merger.merge()
    name = "model.layers.1.self_attn.q_proj.weight"
    sources = [open_source(p) for p in llama_family]
    expected = ties(sources[0].get(name), [s.get(name) for s in sources[1:]], weights=[0.5] * 3,
                    densities=[0.6] * 3)
    assert torch.equal(merger.targets[name], expected)


def test_bert_merge_ignores_non_float_buffers(bert_family: list[Path]) -> None:
    merger = Merger(_recipe(bert_family, method="dare_ties"))
    merger.merge()
    assert all(t.is_floating_point() for t in merger.targets.values())
    assert "classifier.weight" in merger.targets


def test_export_refuses_non_empty_target_and_keeps_it(llama_family: list[Path], tmp_path: Path) -> None:
    merger = Merger(_recipe(llama_family))
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        merger.export(out)
    assert (out / "keep.txt").read_text() == "mine"
    merger.export(out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_failed_export_leaves_nothing(llama_family: list[Path], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    merger = Merger(_recipe(llama_family))

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merger.model, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space"):
        merger.export(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_atomic_folder_success_and_failure(tmp_path: Path) -> None:
    with atomic_folder(tmp_path / "a") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "a" / "f").read_text() == "x"
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "b") as tmp:
            (tmp / "f").write_text("x")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_an_overwrite_whose_last_rename_fails_puts_the_old_folder_back(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The old folder was set aside first; the new one's rename failing (say, a full or read-only parent) left no
    folder at the target, the old one hidden beside it."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "f").write_text("old")
    real = Path.rename

    def rename(self: Path, to: Path) -> Path:
        if ".tmp-" in self.name:
            raise OSError(30, "Read-only file system")
        return real(self, to)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="Read-only"):
        with atomic_folder(target, overwrite=True) as tmp:
            (tmp / "f").write_text("new")
    assert (target / "f").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_cache_folder_another_process_finished_meanwhile_is_kept(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache (``done``): a complete folder written meanwhile by another process, which may be reading it, is kept
    and this one dropped, also where it comes just before the rename or just after the check; an incomplete one is
    replaced, also where another process sets it aside first."""
    target = tmp_path / "cache"

    def done(folder: Path) -> bool:
        return (folder / "done").exists()

    def theirs() -> None:
        target.mkdir()
        (target / "theirs").write_text("b")
        (target / "done").write_text("")

    with atomic_folder(target, done=done) as tmp:
        (tmp / "done").write_text("")
        theirs()  # finished while this one was being written
    assert sorted(p.name for p in target.iterdir()) == ["done", "theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # nothing left beside it
    shutil.rmtree(target)
    rename = Path.rename

    def theirs_first(self: Path, to: Path) -> Path:  # theirs arrives after the check, just before the rename
        if Path(to) == target and not target.exists():
            theirs()
        return rename(self, to)

    monkeypatch.setattr(Path, "rename", theirs_first)
    with atomic_folder(target, done=done) as tmp:
        (tmp / "done").write_text("")
    monkeypatch.undo()
    assert sorted(p.name for p in target.iterdir()) == ["done", "theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
    shutil.rmtree(target)
    checks = []

    def arriving(folder: Path) -> bool:  # theirs finishes just after this one's check
        if not checks:
            theirs()
        checks.append(folder)
        return len(checks) > 1 and done(folder)

    with atomic_folder(target, done=arriving) as tmp:
        (tmp / "done").write_text("")
    assert sorted(p.name for p in target.iterdir()) == ["done", "theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
    shutil.rmtree(target)
    target.mkdir()
    (target / "partial").write_text("")  # a killed run's
    with atomic_folder(target, done=done) as tmp:
        (tmp / "done").write_text("")
    assert [p.name for p in target.iterdir()] == ["done"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
    shutil.rmtree(target)
    target.mkdir()
    (target / "partial").write_text("")

    def set_aside_first(self: Path, to: Path) -> Path:  # another process sets the killed run's folder aside first
        if self == target and (target / "partial").exists():
            shutil.rmtree(target)
        return rename(self, to)

    monkeypatch.setattr(Path, "rename", set_aside_first)
    with atomic_folder(target, done=done) as tmp:
        (tmp / "done").write_text("")
    monkeypatch.undo()
    assert [p.name for p in target.iterdir()] == ["done"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from evoopt.errors import OutputError, OutputExistsError
    from evoopt.models.io import check_writable

    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    check_writable(tmp_path / "new" / "deeper", overwrite=False)  # made when written
    check_writable(tmp_path / "full", overwrite=True)
    with pytest.raises(OutputExistsError, match="already exists and is not empty; choose another --out or pass"):
        check_writable(tmp_path / "full", overwrite=False)
    with pytest.raises(OutputError, match=r"file/sub: .*file is a file, not a folder; choose another --out"):
        check_writable(tmp_path / "file" / "sub", overwrite=False)
    with pytest.raises(OutputError, match=r"file: is a file, not a folder"):
        check_writable(tmp_path / "file", overwrite=True)
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "mine").mkdir()
    access = os.access  # root may write anywhere: the folder's permission as a user without write access sees it
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "locked" and access(path, mode))
    with pytest.raises(OutputError, match=r"cannot write in .*locked \(permission denied\)"):
        check_writable(tmp_path / "locked" / "out", overwrite=False)
    check_writable(tmp_path / "locked" / "mine", overwrite=True, inside=True)  # written inside: its own access counts
    monkeypatch.undo()
    with pytest.raises(OutputError, match=r"file/sub: .*; choose another --out"):
        with atomic_folder(tmp_path / "file" / "sub"):
            pass


def test_resolve_package_paths() -> None:
    assert resolve_path("pkg:evoopt/merge").is_dir()
    with pytest.raises(ModelSourceError, match="pip install --no-deps no-such-package"):
        resolve_path("pkg:no_such_package/x")


def test_mixed_dtypes_need_an_explicit_dtype(llama_family: list[Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    half = tmp_path / "half"
    AutoModelForCausalLM.from_pretrained(llama_family[1]).to(torch.bfloat16).save_pretrained(half)
    with pytest.raises(RecipeError, match="set dtype"):
        Merger(_recipe([llama_family[0], half, llama_family[2]]))
    recipe = _recipe([llama_family[0], half, llama_family[2]])
    recipe.dtype = "bfloat16"  # type: ignore[assignment]
    model = Merger(recipe).merge()
    assert next(model.parameters()).dtype == torch.bfloat16


def test_excluded_heads_keep_the_base_and_skip_shape_checks(bert_family: list[Path], tmp_path: Path) -> None:
    from tests.helpers.models import tiny_bert_config

    other_head = save_family(tmp_path, tiny_bert_config(num_labels=5), experts=0, seed=2,
                             model_class="BertForSequenceClassification")[0]
    models = [{"model": str(bert_family[1])}, {"model": str(other_head)}]
    with pytest.raises(ModelSourceError, match="classifier.weight"):
        Merger(parse_recipe({"method": "task_arithmetic", "base": str(bert_family[0]), "models": models}))
    merger = Merger(parse_recipe({"method": "task_arithmetic", "base": str(bert_family[0]), "models": models,
                                  "exclude": ["classifier.*"]}))
    assert not any(name.startswith("classifier") for name in merger.targets)
    model = merger.merge()
    assert torch.equal(model.classifier.weight, open_source(bert_family[0]).get("classifier.weight"))


@pytest.mark.parametrize("method", ["tsv", "iso_cts", "della", "sce"])
def test_newer_methods_merge_models_as_their_pure_functions(llama_family: list[Path], method: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a Merger (TSV-M: its basis computed once, DELLA: its magnitude ranks) every tensor equals
    the pure function's, for weights that include 0 and a negative one."""
    from evoopt.merge import get_method

    base, *experts = llama_family
    weights = [0.8, 0.0, -0.4]
    per_model = [{"weight": w, **({"density": 0.5} if method == "della" else {})} for w in weights]
    recipe = parse_recipe({"method": method, "base": str(base), "seed": 3,
                           "models": [{"model": str(e), "parameters": p} for e, p in zip(experts, per_model)]})
    merger = Merger(recipe)
    assert bool(merger.cached) == (method in ("tsv", "della"))  # their coefficient-independent parts, once
    written: list[torch.Tensor] = []
    if method == "della":  # DELLA's kernel writes straight into the model's tensors (no copy after it)
        from evoopt.merge import _methods

        kernel = _methods.della_merge
        monkeypatch.setattr(_methods, "della_merge", lambda *a, **k: written.append(kernel(*a, **k)) or written[-1])
    merger.merge()
    if method == "della":
        assert len(written) == len(merger.targets) and all(w is t for w, t in zip(written, merger.targets.values()))
    sources = [open_source(p) for p in llama_family]
    for name, target in merger.targets.items():
        expected = get_method(method).apply(sources[0].get(name), [s.get(name) for s in sources[1:]],
                                            recipe.coefficients(name, 3), seed=3, name=name)
        torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_bfloat16_sources_keep_a_bfloat16_state_with_the_same_bytes(llama_family: list[Path], tmp_path: Path,
                                                                    method: str) -> None:
    """Sources stored in bfloat16: the fast path keeps them as they are (2 bytes per entry and model, not float32
    task vectors) and merges into the model the bytes of the pure function on the same tensors."""
    from transformers import AutoModelForCausalLM

    from evoopt.merge import get_method

    half = []
    for path in llama_family:
        half.append(tmp_path / path.name)
        AutoModelForCausalLM.from_pretrained(path).to(torch.bfloat16).save_pretrained(half[-1])
    recipe = _recipe(half, method)
    recipe.dtype = "float32"  # a float32 model: the state stays bfloat16
    merger = Merger(recipe)
    assert merger.prepared is not None
    assert all(p.stored and p.deltas.dtype == torch.bfloat16 for p in merger.prepared.values())
    model = merger.merge()
    base, sources = open_source(half[0]), [open_source(p) for p in half[1:]]
    for name, target in merger.targets.items():  # the pure function on the same values, in float32
        expected = get_method(method).apply(base.get(name).float(), [s.get(name).float() for s in sources],
                                            recipe.coefficients(name, len(sources)), seed=recipe.seed, name=name)
        assert torch.equal(target, expected.reshape(target.shape)), name
    assert next(model.parameters()).dtype == torch.float32


def test_float64_sources_merge_in_float64(llama_family: list[Path], tmp_path: Path) -> None:
    """A float64 model is merged by the pure function in float64 (the fast path computes in float32)."""
    from transformers import AutoModelForCausalLM

    from evoopt.merge import get_method

    wide = []
    for path in llama_family:
        wide.append(tmp_path / path.name)
        AutoModelForCausalLM.from_pretrained(path).to(torch.float64).save_pretrained(wide[-1])
    recipe = _recipe(wide, "ties")
    merger = Merger(recipe)
    assert merger.prepared is None
    merger.merge()
    base, sources = open_source(wide[0]), [open_source(p) for p in wide[1:]]
    for name, target in merger.targets.items():
        expected = get_method("ties").apply(base.get(name), [s.get(name) for s in sources],
                                            recipe.coefficients(name, len(sources)), seed=recipe.seed, name=name)
        assert target.dtype == torch.float64 and torch.equal(target, expected.reshape(target.shape)), name


@pytest.mark.parametrize("method", ["della", "tsv", "linear", "linear with a base"])
def test_bfloat16_sources_merged_into_a_float32_model_by_the_other_methods_keep_float32(
        llama_family: list[Path], tmp_path: Path, method: str) -> None:
    """Sources in bfloat16, the recipe's model in float32: the methods outside the fast path compute in float32 and
    the model gets their float32 result (they returned the base's bfloat16, and 13 of 64 entries differed)."""
    from transformers import AutoModelForCausalLM

    from evoopt.merge import get_method

    half = []
    for path in llama_family:
        half.append(tmp_path / path.name)
        AutoModelForCausalLM.from_pretrained(path).to(torch.bfloat16).save_pretrained(half[-1])
    name, based = method.split()[0], method != "linear"  # (linear takes its dtype from the first model, not the base)
    per_model = {"weight": 0.7, "density": 0.6} if name == "della" else {"weight": 0.7}
    models = [{"model": str(p), "parameters": per_model} for p in (half[1:] if based else half)]
    recipe = parse_recipe({"method": name, **({"base": str(half[0])} if based else {}),
                           "models": models, "dtype": "float32"})
    merger = Merger(recipe)
    assert merger.prepared is None
    merger.merge()
    sources = [open_source(p) for p in half]
    for key, target in merger.targets.items():
        tensors = [s.get(key).float() for s in sources]
        base, rest = (tensors[0], tensors[1:]) if based else (None, tensors)
        expected = get_method(name).apply(base, rest, recipe.coefficients(key, len(rest)), seed=recipe.seed, name=key)
        assert target.dtype == torch.float32
        torch.testing.assert_close(target, expected.reshape(target.shape), rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_memory_budget_streams_the_sources_with_the_same_bytes(llama_family: list[Path], tmp_path: Path,
                                                                 dtype: torch.dtype) -> None:
    """A budget smaller than the fast path's state: the state is memory-mapped views of the sources' files (only
    the magnitude grids kept), and each merge gives the in-memory merge's bytes."""
    from transformers import AutoModelForCausalLM

    paths = llama_family
    if dtype != torch.float32:
        paths = [tmp_path / p.name for p in llama_family]
        for path, out in zip(llama_family, paths):
            AutoModelForCausalLM.from_pretrained(path).to(dtype).save_pretrained(out)
    for method in ("ties", "dare_ties", "task_arithmetic"):
        in_memory = Merger(_recipe(paths, method))
        streamed = Merger(_recipe(paths, method).model_copy(update={"memory_budget": 1e-6}))  # 1 KiB
        assert not in_memory.streamed and streamed.streamed
        assert streamed.prepared is not None and all(p.streamed_state for p in streamed.prepared.values())
        for seed, weight in ((0, 0.5), (3, 0.9)):
            recipe = _recipe(paths, method)
            for spec in recipe.models:
                spec.parameters["weight"] = weight
            in_memory.merge(recipe, seed=seed)
            streamed.merge(recipe, seed=seed)
            for name, target in in_memory.targets.items():
                assert torch.equal(streamed.targets[name], target), (method, name)


def test_a_pinned_state_is_packed_in_power_of_two_blocks(llama_family: list[Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path's state in pinned host memory: torch's pinned allocator rounds every block up to a power of two,
    so one block per dtype pinned up to twice the state. state_layout packs the tensors first-fit decreasing into
    blocks that are powers of two (checked by hand); its views are disjoint; a Merger whose state is laid out so (on
    the CPU the same blocks, unpinned) merges the same bytes, and streams when the state with its blocks' rounding
    passes the memory budget."""
    import evoopt.merge.merger as merger_module
    from evoopt.merge.merger import state_layout, state_views

    # slab 1024 entries: 2000 opens a block of 2048; 900 one of 1024, then 100 joins it (1000); 300 opens a third,
    # 60 and 50 join it (410); each block cut to the power of two its tensors fill
    assert state_layout([300, 100, 900, 50, 60, 2000], torch.float32, pinned=True, slab_bytes=4096) == (
        [2048, 1024, 512], [(2, 0), (1, 900), (1, 0), (2, 360), (2, 300), (0, 0)])
    assert state_layout([5, 3, 2], torch.bfloat16) == ([10], [(0, 0), (0, 5), (0, 8)])  # in memory: one block
    numels = [int(n) for n in torch.randint(1, 700, (60,), generator=torch.Generator().manual_seed(0))]
    layout = state_layout(numels, torch.float32, pinned=True, slab_bytes=2048)
    assert all(size & (size - 1) == 0 for size in layout[0]) and sum(layout[0]) < 1.25 * sum(numels)
    views = state_views(numels, layout, torch.float32)
    for i, view in enumerate(views):
        view.fill_(i)
    assert [v.numel() for v in views] == numels and all(bool((v == i).all()) for i, v in enumerate(views))

    plain = Merger(_recipe(llama_family, "dare_ties"))
    def packed_layout(numels: list[int], dtype: torch.dtype, pinned: bool = False) -> merger_module.Layout:
        return state_layout(numels, dtype, pinned=True, slab_bytes=2**12)

    monkeypatch.setattr(merger_module, "state_layout", packed_layout)
    packed = Merger(_recipe(llama_family, "dare_ties"))
    assert packed.prepared is not None and not packed.streamed
    for seed in (0, 5):
        plain.merge(seed=seed)
        packed.merge(seed=seed)
        for name, target in plain.targets.items():
            assert torch.equal(packed.targets[name], target), name
    sizes = [2 * t.numel() for t in plain.targets.values()]  # (two experts' task vectors, float32)
    state = 4 * 3 * sum(t.numel() for t in plain.targets.values())
    rounded = 4 * (sum(packed_layout(sizes, torch.float32)[0]) - sum(sizes))
    assert rounded > 0
    between = _recipe(llama_family, "dare_ties").model_copy(update={"memory_budget": (state + rounded / 2) / 2**30})
    assert Merger(between).streamed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_finite_check_finds_every_nan_and_inf(dtype: torch.dtype) -> None:
    """One NaN, inf or -inf anywhere (first, last, inside a vector's lanes, past a chunk) fails the check; large and
    subnormal finite values, signed zeros and empty or non-contiguous tensors pass."""
    from evoopt.models.io import _all_finite

    base = torch.linspace(-1, 1, 100_003).to(dtype)
    assert _all_finite(base) and _all_finite(torch.empty(0, dtype=dtype)) and _all_finite(base[::3])
    info = torch.finfo(dtype)
    assert _all_finite(torch.tensor([info.max, -info.max, info.tiny / 2, -0.0, 0.0], dtype=dtype))
    for value in (float("nan"), float("inf"), float("-inf")):
        for index in (0, 1, 7, 15, 16, 65_537, 100_002):
            bad = base.clone()
            bad[index] = value
            assert not _all_finite(bad), (value, index)
            assert not _all_finite(bad.reshape(-1, 1)[:, 0]) and not _all_finite(bad[index:index + 1])


def _advised_for_huge_pages(tensor: torch.Tensor) -> bool:
    """Whether the mapping holding ``tensor`` carries madvise(MADV_HUGEPAGE) (``hg`` in its smaps VmFlags)."""
    address, mapping = tensor.data_ptr(), None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            start, end = (int(x, 16) for x in head.split("-"))
            mapping = start <= address < end
        elif line.startswith("VmFlags:") and mapping:
            return "hg" in line.split()[1:]
    return False


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE"), reason="madvise(MADV_HUGEPAGE): Linux only")
def test_the_in_memory_state_is_advised_for_huge_pages(llama_family: list[Path],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """huge_page_empty: a writable tensor of the asked size in a private anonymous mapping advised for transparent
    huge pages, alive as long as the tensor; below a huge page, an ordinary tensor. A Merger whose state is advised
    (every store, with the threshold lowered for these small models) merges the same bytes as one whose is not."""
    import gc

    import evoopt.merge.merger as merger_module
    from evoopt.merge.merger import huge_page_empty

    state = huge_page_empty(3 * 2**20, torch.bfloat16)  # 6 MiB
    assert state.shape == (3 * 2**20,) and state.dtype == torch.bfloat16 and state.is_contiguous()
    gc.collect()  # the mapping's Python object is gone: the tensor holds the memory
    state.copy_(torch.arange(state.numel(), dtype=torch.float32).to(torch.bfloat16))
    assert state[-1].item() == float(torch.tensor(3 * 2**20 - 1, dtype=torch.bfloat16))
    enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if enabled.exists() and "[never]" not in enabled.read_text():
        assert _advised_for_huge_pages(state)
    assert huge_page_empty(100, torch.float32).shape == (100,)
    assert not _advised_for_huge_pages(huge_page_empty(100, torch.float32))

    plain = Merger(_recipe(llama_family, "ties"))
    monkeypatch.setattr(merger_module, "HUGE_PAGE", 1)
    advised = Merger(_recipe(llama_family, "ties"))
    assert advised.prepared is not None and not advised.streamed
    if enabled.exists() and "[never]" not in enabled.read_text():
        assert all(_advised_for_huge_pages(p.deltas) for p in advised.prepared.values())  # type: ignore[arg-type]
    for seed in (0, 5):
        plain.merge(seed=seed)
        advised.merge(seed=seed)
        for name, target in plain.targets.items():
            assert torch.equal(advised.targets[name], target), name


def test_the_gpu_path_places_each_state_beside_the_evaluations_reserve_by_hand() -> None:
    """A state goes on the GPU when it leaves the evaluation its reserve: the rest of GPU_SHARE (0.75) of what is
    free when the first Merger places its state; a method search's later Mergers keep that reserve (each took 0.75
    of what was free then, and two left the evaluation 6 % of the GPU)."""
    from evoopt.merge.merger import GPU_SHARE, gpu_placement

    assert GPU_SHARE == 0.75
    free = 80 * 2**30
    first, reserve = gpu_placement(12 * 2**30, free, None)
    assert first and reserve == 20 * 2**30  # 12 GiB <= 80 - 20
    assert gpu_placement(12 * 2**30, free - 12 * 2**30, reserve) == (True, reserve)  # 12 <= 68 - 20
    assert gpu_placement(12 * 2**30, free - 60 * 2**30, reserve) == (False, reserve)  # 12 > 20 - 20: host memory
    assert gpu_placement(61 * 2**30, free, None)[0] is False  # more than 0.75 of the free memory
