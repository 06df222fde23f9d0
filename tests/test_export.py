"""`memlayers export`: a checkpoint as config.json + safetensors + tokenizer + card, read back by load_pretrained."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memlayers.models.pretrained import load_pretrained
from memlayers.platform.cluster.local_launch import run_local
from memlayers.platform.data.prepare import prepare_data
from memlayers.platform.eval.loading import load_trained
from memlayers.platform.train.export import export_checkpoint
from memlayers.platform.train.loop import RunLoop
from memlayers.platform.train.run_config import run_config_from_dict

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_workers import save_sharded_copy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN = {"name": "exp", "model": {"base": "nano", "family": "memory_plus", "memory_slots": 256,
                                "memory": {"heads": 2, "topk": 4}},
       "data": {"source": "facts", "tokenizer": "word", "seq_len": 16, "facts": {"people": 30, "renderings": 2}},
       "train": {"steps": 3, "batch_size": 4}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Memory+ checkpoint after 3 steps, and the same weights saved as 2 column shards."""
    root = tmp_path_factory.mktemp("export")
    cfg = run_config_from_dict(RUN)
    loop = RunLoop(cfg, prepare_data(cfg.data, root / "cache"))
    for _ in range(3):
        loop.train_step()
    loop.save(root / "p1")
    run_local(save_sharded_copy, 2, RUN, str(root / "cache"), str(root / "p1"), str(root / "p2"))
    return root


def test_export_loads_back_to_identical_logits(trained, tmp_path):
    out = tmp_path / "model"
    exported = export_checkpoint(trained / "p1", out)
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "README.md" in files and "model.safetensors.index.json" in files
    assert [p.name for p in exported.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert not [f for f in files if f.endswith((".pt", ".bin", ".pkl"))]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    table_file = index["weight_map"]["memory_values.weight"]
    assert [n for n, f in index["weight_map"].items() if f == table_file] == ["memory_values.weight"]
    assert "memory_plus" in (out / "README.md").read_text()

    model = load_pretrained(out)
    reference = load_trained(trained / "p1").model
    tokens = torch.randint(0, reference.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(tokens), reference(tokens))


def test_exported_folder_opens_with_safetensors_alone(trained, tmp_path):
    export_checkpoint(trained / "p1", tmp_path)
    child = ("import json, sys; from safetensors.numpy import load_file; "
             f"index = json.load(open({str(tmp_path / 'model.safetensors.index.json')!r})); "
             f"arrays = {{}}; [arrays.update(load_file({str(tmp_path)!r} + '/' + f)) "
             "for f in set(index['weight_map'].values())]; "
             "assert set(arrays) == set(index['weight_map']), 'names'; assert 'torch' not in sys.modules, 'torch'; "
             "print(len(arrays), arrays['memory_values.weight'].shape)")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[1:] == ["(256,", "32)"], proc.stdout


def test_memory_parallel_shards_export_the_same_bytes(trained, tmp_path):
    assert len(list((trained / "p2").glob("values-t0-p2-r*.pt"))) == 2
    one = export_checkpoint(trained / "p1", tmp_path / "one")
    two = export_checkpoint(trained / "p2", tmp_path / "two", max_file_bytes=1 << 30)
    for a, b in zip(one.files, two.files, strict=True):
        assert a.name == b.name and a.read_bytes() == b.read_bytes(), a.name


def test_eval_adapter_generates_from_an_exported_folder(trained, tmp_path):
    from memlayers.platform.eval.lm_adapter import MemlayersLM

    export_checkpoint(trained / "p1", tmp_path)
    exported = MemlayersLM.from_exported(str(tmp_path))
    reference = load_trained(trained / "p1")
    original = MemlayersLM(reference.model, reference.tokenizer)
    pairs = [exported.encode_pair("alice lives in", " paris")]
    assert exported._score(pairs) == original._score(pairs)
    assert exported._generate(["alice lives in"], {"max_gen_toks": 4}) == \
        original._generate(["alice lives in"], {"max_gen_toks": 4})
