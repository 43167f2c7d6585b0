"""msgfm export and the DeepSpeed-free backbone: the files, determinism, errors, equality with msgfm's
DeepSpeed model (MoE and dense, random inputs and a real BigEarthNet patch), a process without DeepSpeed,
timm by name, and the export as an MLflow logged model.

The pretraining run (tiny_pretrained_run, tests/conftest.py) holds weights perturbed away from their
initial values, so an export that mixed up two tensors of the same shape (two LayerNorms) fails here.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import msgfm
from msgfm.backbone import load_backbone
from msgfm.cli import main as msgfm_main
from msgfm.config import config_from_dict
from msgfm.errors import UserError
from msgfm.export import export
from msgfm.finetune.transfer import sensor_embeddings, stack_embeddings
from msgfm.models import MsGFMBackbone
from msgfm.sensors import get_sensor
from msgfm.tasks import build_pretrain_task
from msgfm.train import checkpoint as ckpt
from msgfm.train.safe_load import load_weights

TOL = 1e-5
GATE = "encoder.layers.2.blocks.1.mlp.gate.weight"


@pytest.fixture(scope="module")
def exported(tiny_pretrained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny"
    export(tiny_pretrained_run, out)
    return out


def reference_backbone(run_or_ckpt: Path, sensors=None) -> MsGFMBackbone:
    """msgfm's own backbone (DeepSpeed MoE) with the checkpoint's weights, evaluated without token dropping."""
    folder = ckpt.resolve_checkpoint_dir(run_or_ckpt)
    tree = load_weights(folder / ckpt.MODEL_STATES, "test")["msgfm"]["config"]
    tree["model"]["moe"].update(expert_parallel_size=1, eval_capacity_factor=float(tree["model"]["moe"]["num_experts"]))
    cfg = config_from_dict(tree)
    state = ckpt.load_model_state_dict(folder)
    backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if sensors is None:
        task = build_pretrain_task(cfg)
        task.load_state_dict(state, strict=True)
        return task.backbone.eval()
    # several sensors stacked along channels: fine-tuning's method 2 (msgfm/finetune/transfer.py)
    name = "+".join(sensors)
    model = MsGFMBackbone(cfg.model, cfg.kernels, {name: sum(get_sensor(s).num_channels for s in sensors)},
                          mask_token=False)
    stacked, _ = stack_embeddings(sensor_embeddings(backbone_state), sensors,
                                  {s: get_sensor(s).num_channels for s in sensors},
                                  {k[len(f"embeddings.{name}."):]: v for k, v in model.state_dict().items()
                                   if k.startswith("embeddings.")})
    own = {k: v for k, v in backbone_state.items() if k.startswith("encoder.")}
    own.update({f"embeddings.{name}.{k}": v for k, v in stacked.items()})
    model.load_state_dict(own, strict=True)
    return model.eval()


def assert_same_features(ours, ref, x, sensor=None):
    with torch.no_grad():
        expected = ref.forward_intermediates(x, sensor, output_fmt="NCHW")
        got = ours.forward_intermediates(x, indices=4, output_fmt="NCHW", intermediates_only=True)
        final_ref, final_ours = ref.forward_features(x, sensor), ours.forward_features(x)
    assert len(got) == len(expected) == 4
    for stage, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape, stage
        assert (a - b).abs().max() < TOL, f"stage {stage}: {(a - b).abs().max()}"
    assert (final_ours - final_ref).abs().max() < TOL


# ------------------------------------------------------------------ the files


def test_export_files_naming_and_config(exported, tiny_pretrained_run):
    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((exported / "config.json").read_text())
    weights = load_file(str(exported / "model.safetensors"))
    arch = config["architecture"]
    assert arch["img_size"] == 32 and arch["moe"]["num_experts"] == 4 and arch["moe"]["blocks"] == {"2": [1]}
    assert weights[GATE].shape == (4, 128)
    assert {f"encoder.layers.2.blocks.1.mlp.experts.{e}.fc1.weight" for e in range(4)} <= set(weights)
    assert not any("deepspeed" in k or k.startswith("decoders.") for k in weights)
    assert sorted(config["sensors"]) == ["dsm", "rgb", "s2", "sar"]
    # band names in storage order and the statistics the run normalized with, per data group
    stats = load_weights(ckpt.resolve_checkpoint_dir(tiny_pretrained_run) / ckpt.MODEL_STATES, "t")["msgfm"]["stats"]
    for sensor, entry in config["sensors"].items():
        assert entry["bands"] == list(get_sensor(sensor).bands)
        assert len(entry["wavelengths_nm"]) == len(entry["bands"])
        groups = sorted(g for norm in entry["normalization"] for g in norm["groups"])
        assert groups == sorted(g for g, s in stats.items() if sensor in s["sensors"])
        for norm in entry["normalization"]:
            assert norm["mean"] == stats[norm["groups"][0]]["sensors"][sensor]["mean"]
        assert entry["storage"] is not None  # the shards are beside the run: scale/offset recorded
    rgb_groups = [n["groups"] for n in config["sensors"]["rgb"]["normalization"]]
    assert rgb_groups == [["rgb"], ["mdas"]]  # they differ; the config's group order (the first is the default)
    prov = config["provenance"]
    assert prov["step"] == 2 and prov["checkpoint"] == "step00000002" and len(prov["config_hash"]) == 16
    assert prov["exported_by"]["msgfm_version"] == msgfm.__version__
    card = (exported / "README.md").read_text()
    assert "| B8A | 864.7 |" in card and prov["config_hash"] in card


def test_export_is_deterministic_and_subsettable(tiny_pretrained_run, exported, tmp_path):
    again = tmp_path / "again"
    assert msgfm_main(["export", str(tiny_pretrained_run), "-o", str(again), "--no-mlflow"]) == 0
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (again / name).read_bytes() == (exported / name).read_bytes(), name
    export(tiny_pretrained_run, tmp_path / "s2", sensors=["s2"], decoders=True)
    weights = load_file(str(tmp_path / "s2" / "model.safetensors"))
    assert {k.split(".")[1] for k in weights if k.startswith(("embeddings.", "decoders."))} == {"s2"}
    assert "decoders.s2.proj.weight" in weights


def test_clear_errors(tiny_pretrained_run, exported, tmp_path, capsys):
    with pytest.raises(UserError, match="no msgfm/DeepSpeed checkpoint"):
        export(tmp_path, tmp_path / "out")
    with pytest.raises(UserError, match=r"never saw sensor\(s\) \['pan'\]"):
        export(tiny_pretrained_run, tmp_path / "out", sensors=["pan"])
    with pytest.raises(UserError, match="--dense-only: the model has MoE layers"):
        export(tiny_pretrained_run, tmp_path / "out", dense_only=True)
    torn = tmp_path / "torn"
    shutil.copytree(ckpt.resolve_checkpoint_dir(tiny_pretrained_run), torn)
    expert = torn / "layer_0_expert_3_mp_rank_00_model_states.pt"
    expert.write_bytes(expert.read_bytes()[:100])
    assert msgfm_main(["export", str(torn), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "damaged" in err and "layer_0_expert_3" in err
    with pytest.raises(UserError, match="not found; an msgfm export folder holds config.json"):
        load_backbone(tmp_path / "nothing")
    with pytest.raises(UserError, match=r"\['pan'\]: the model was not trained on them; it knows"):
        load_backbone(exported, sensors="pan")


# ------------------------------------------------------------------ equality with msgfm's DeepSpeed model


@pytest.mark.parametrize("sensors", [["s2"], ["rgb"], ["sar", "s2"]])
def test_load_backbone_equals_deepspeed_model_on_random_inputs(exported, tiny_pretrained_run, sensors):
    ours = load_backbone(exported, sensors=sensors)
    ref = reference_backbone(tiny_pretrained_run, None if len(sensors) == 1 else sensors)
    channels = sum(get_sensor(s).num_channels for s in sensors)
    assert ours.in_chans == channels and ours.bands[0].startswith(sensors[0] + ":")
    x = torch.randn(3, channels, 32, 32, generator=torch.Generator().manual_seed(3))
    assert_same_features(ours, ref, x, sensors[0] if len(sensors) == 1 else None)


def test_swapped_layernorms_in_an_export_are_caught(exported, tiny_pretrained_run, tmp_path):
    """The mutation the audit found: two LayerNorms swapped in the export must change the outputs."""
    shutil.copytree(exported, tmp_path / "swapped")
    weights = load_file(str(exported / "model.safetensors"))
    a, b = "encoder.layers.1.blocks.0.norm1", "encoder.layers.1.blocks.0.norm2"
    for param in ("weight", "bias"):
        weights[f"{a}.{param}"], weights[f"{b}.{param}"] = weights[f"{b}.{param}"], weights[f"{a}.{param}"]
    save_file(weights, str(tmp_path / "swapped" / "model.safetensors"))
    x = torch.randn(2, 12, 32, 32, generator=torch.Generator().manual_seed(4))
    ref = reference_backbone(tiny_pretrained_run)
    with torch.no_grad():
        swapped = load_backbone(tmp_path / "swapped", sensors="s2").forward_features(x)
        assert (swapped - ref.forward_features(x, "s2")).abs().max() > 100 * TOL


def bigearthnet_s2_patch(folder: Path, size: int = 32) -> torch.Tensor:
    """One real BigEarthNet S2 patch, bands in s2's storage order, 20/60 m bands repeated onto the 10 m grid,
    a size x size crop, each band standardized."""
    import rasterio

    patch = sorted((folder / "bigearthnet_mm_v1" / "BigEarthNet-S2-Example").iterdir())[0]
    bands = []
    for band in get_sensor("s2").bands:
        with rasterio.open(patch / f"{patch.name}_{band}.tif") as src:
            array = src.read(1).astype(np.float32)
        array = np.kron(array, np.ones((120 // array.shape[0],) * 2, dtype=np.float32))[:size, :size]
        bands.append((array - array.mean()) / (array.std() + 1e-6))
    return torch.from_numpy(np.stack(bands))[None]


@pytest.mark.realdata
def test_load_backbone_equals_deepspeed_model_on_a_real_bigearthnet_patch(exported, tiny_pretrained_run, realdata):
    x = bigearthnet_s2_patch(realdata)
    assert_same_features(load_backbone(exported, sensors="s2"), reference_backbone(tiny_pretrained_run), x, "s2")


def test_dense_export_equals_msgfm_and_loads_into_timm_swin(tmp_path):
    """A dense model (a checkpoint in msgfm's layout, weights perturbed): load_backbone and timm's own Swin."""
    from msgfm.config import load_config

    cfg = load_config("demo_cpu", ["model.moe.enabled=false", "model.img_size=32"])
    torch.manual_seed(0)
    task = build_pretrain_task(cfg)
    with torch.no_grad():
        for p in task.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path / "run" / "checkpoints" / "step00000005"
    folder.mkdir(parents=True)
    torch.save({"module": task.state_dict(), "msgfm": {"config": cfg.to_dict(), "step": 5, "stats": {}}},
               folder / ckpt.MODEL_STATES)
    (folder / "COMPLETE").write_text(json.dumps({"step": 5, "world_size": 1, "tag": folder.name}))
    export(tmp_path / "run", tmp_path / "dense", sensors=["s2"], dense_only=True)
    ours = load_backbone(tmp_path / "dense", sensors="s2")
    x = torch.randn(2, 12, 32, 32, generator=torch.Generator().manual_seed(5))
    assert_same_features(ours, task.backbone.eval(), x, "s2")
    plain = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=0, img_size=32,
                              patch_size=4, in_chans=12, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                              window_size=4).eval()
    plain.load_state_dict(ours.state_dict(), strict=True)  # a dense export is a plain timm Swin
    with torch.no_grad():
        assert (plain.forward_features(x) - ours.forward_features(x)).abs().max() < TOL


# ------------------------------------------------------------------ no DeepSpeed, timm by name, the contract

BLOCKER = '''
import importlib.abc, sys
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("deepspeed", "mlflow", "rasterio"):
            raise ModuleNotFoundError(f"blocked for this test: {name}")
        return None
sys.meta_path.insert(0, _Blocked())
'''

CHILD = '''
import sys, torch, timm
import msgfm
model = msgfm.load_backbone(sys.argv[1], sensors="s2")
x = torch.randn(2, 12, 32, 32, generator=torch.Generator().manual_seed(6))
named = timm.create_model("msgfm_tiny", pretrained=True, features_only=True, sensors=["s2"],
                          pretrained_cfg_overlay={"file": sys.argv[1] + "/model.safetensors"})
with torch.no_grad():
    torch.save({"features": model.forward_features(x), "timm": named(x)}, sys.argv[2])
try:
    import deepspeed  # noqa: F401
    sys.exit("deepspeed was importable")
except ModuleNotFoundError:
    pass
print(sorted(m for m in sys.modules if m.split(".")[0] in ("deepspeed", "mlflow", "rasterio")))
'''


@pytest.mark.slow
def test_backbone_runs_where_deepspeed_cannot_be_imported(exported, tiny_pretrained_run, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {"PYTHONPATH": f"{tmp_path}:{Path(msgfm.__file__).parents[1]}", "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", CHILD, str(exported), str(tmp_path / "out.pt")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"  # nothing of DeepSpeed, MLflow or rasterio loaded
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    x = torch.randn(2, 12, 32, 32, generator=torch.Generator().manual_seed(6))
    ref = reference_backbone(tiny_pretrained_run)
    with torch.no_grad():
        assert (out["features"] - ref.forward_features(x, "s2")).abs().max() < TOL
        expected = ref.forward_intermediates(x, "s2", output_fmt="NCHW")
    assert [f.shape for f in out["timm"]] == [e.shape for e in expected]
    assert all((f - e).abs().max() < TOL for f, e in zip(out["timm"], expected))


def test_paper_architectures_by_name_have_the_papers_parameter_counts():
    """msgfm_swinb_192 (MoE) and its dense sibling, built on the meta device: encoder parameters (no patch
    embedding) as msgfm's own model counts them (README: 219,037,368 with MoE, 86,718,648 dense = timm's Swin-B)."""
    with torch.device("meta"):
        moe = timm.create_model("msgfm_swinb_192")
        dense = timm.create_model("msgfm_swinb_192_dense")

    def encoder(model):
        return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("patch_embed."))

    assert encoder(moe) == 219_037_368 and encoder(dense) == 86_718_648
    assert sorted(moe.moe_layers()) == [f"layers.2.blocks.{j}.mlp" for j in sorted(range(1, 18, 2), key=str)]
    assert moe.in_chans == 3 and moe.sensors == ["rgb"]  # no file: the config's first sensor


def test_timm_names_and_the_backbone_contract(exported):
    assert {"msgfm_swinb_192", "msgfm_swinb_192_dense", "msgfm_tiny", "msgfm_swin"} <= set(timm.list_models("msgfm*"))
    file = {"file": str(exported / "model.safetensors")}
    features = timm.create_model("msgfm_swin", pretrained=True, features_only=True, sensors=["sar", "s2"],
                                 pretrained_cfg_overlay=file, out_indices=(1, 3))
    assert features.feature_info.channels() == [64, 256] and features.feature_info.reduction() == [8, 32]
    # timm's data config normalizes with the statistics the model was trained with
    data_config = timm.data.resolve_model_data_config(features)
    config = json.loads((exported / "config.json").read_text())
    expected_mean = [v for s in ("sar", "s2") for v in config["sensors"][s]["normalization"][0]["mean"]]
    assert list(data_config["mean"]) == expected_mean and data_config["input_size"] == (14, 32, 32)
    with pytest.raises(UserError, match="differs from msgfm_swinb_192's"):
        timm.create_model("msgfm_swinb_192", pretrained=True, pretrained_cfg_overlay=file)
    with pytest.raises(UserError, match="pretrained=True needs the export's weights"):
        timm.create_model("msgfm_tiny", pretrained=True)
    model = load_backbone(exported, sensors="s2")
    assert "layers.0.blocks.0.attn.relative_position_bias_table" in model.no_weight_decay()
    nhwc = model.forward_intermediates(torch.randn(1, 12, 32, 32), indices=[0], output_fmt="NHWC",
                                       intermediates_only=True)
    assert nhwc[0].shape == (1, 8, 8, 32)
    model.train().set_grad_checkpointing(True)
    out = model.forward_features(torch.randn(2, 12, 32, 32))
    (out.mean() + model.aux_loss()).backward()
    gate = model.layers[2].blocks[1].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0  # the router trains (aux loss and outputs)
    assert model.layers[0].blocks[0].norm1.weight.grad is not None


# ------------------------------------------------------------------ MLflow


def test_export_is_logged_as_an_mlflow_model_of_its_run(tiny_pretrained_run, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("export-test", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tiny_pretrained_run / "exports" / "logged"  # inside the run folder: its tag is relative
    assert msgfm_main(["export", str(tiny_pretrained_run), "-o", str(out), "--mlflow-run", run_id]) == 0
    models = client.search_logged_models(experiment_ids=[experiment])
    assert len(models) == 1
    model = models[0]
    assert model.source_run_id == run_id and "READY" in str(model.status) and model.name == "msgfm-backbone"
    assert model.params["sensors"] == "rgb,s2,sar,dsm" and model.params["sensors.sar.bands"] == "VV,VH"
    assert model.tags["msgfm.export_dir"] == "exports/logged"
    files = {f.path for f in client.list_logged_model_artifacts(model.model_id)}
    assert files == {"model.safetensors", "config.json", "README.md"}


def test_a_tracked_run_whose_mlflow_run_is_gone_still_exports(tiny_pretrained_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_pretrained_run, run, ignore=shutil.ignore_patterns("exports"))
    (run / "mlflow_run_id").write_text("0123456789abcdef0123456789abcdef")  # tracked, in a store that lost it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert msgfm_main(["export", str(run), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert "logging it to MLflow run 0123456789abcdef0123456789abcdef" in capsys.readouterr().err
    # asked for explicitly, the same failure is the command's: one line, exit 2
    assert msgfm_main(["export", str(run), "-o", str(tmp_path / "out"), "--mlflow-run", "0" * 32]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"MLflow run {'0' * 32} not found" in err


def test_a_fine_tuning_run_exports_its_stacked_backbone(tmp_path):
    from msgfm.config import load_config
    from msgfm.config.finetune import load_finetune_config, save_finetune_config
    from msgfm.finetune.build import encoder_config, new_model

    run_cfg = load_config("demo_cpu", ["model.moe.expert_parallel_size=1", "model.img_size=32"])
    cfg = load_finetune_config("ft_ben_tiny", ["task.sensors=[sar, s2]", "model.img_size=32"])
    torch.manual_seed(0)
    model = new_model(cfg, encoder_config(cfg, run_cfg.to_dict()["model"])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg.model = model.backbone.model_cfg  # what a fine-tuning run records
    run = tmp_path / "ft_run"
    (run / "best").mkdir(parents=True)
    save_finetune_config(cfg, run / "config.yaml")
    torch.save(model.state_dict(), run / "best" / "model.pt")
    config, source = export(run, tmp_path / "export")
    # a run fine-tuned before msgfm recorded its inputs: the backbone only, and a note why
    assert config["task"] is None and not (tmp_path / "export" / "task").exists()
    assert any("msgfm predict cannot run it" in note for note in config["provenance"]["notes"])
    (run / "model_inputs.json").write_text('{"recorded": "as the run wrote it"}\n')
    config, source = export(run, tmp_path / "export")
    assert config["task"]["name"] == cfg.task.name and config["task"]["tensors"] == len(model.state_dict())
    task_dir = tmp_path / "export" / "task"
    assert (task_dir / "config.yaml").read_bytes() == (run / "config.yaml").read_bytes()
    assert (task_dir / "model_inputs.json").read_bytes() == (run / "model_inputs.json").read_bytes()
    task_state = load_file(str(task_dir / "model.safetensors"))
    assert task_state.keys() == model.state_dict().keys()
    assert all(torch.equal(task_state[k], v) for k, v in model.state_dict().items())
    # deterministic with its task/ folder too: the same run gives the same bytes, file by file
    export(run, tmp_path / "again")
    files = sorted(p.relative_to(tmp_path / "export") for p in (tmp_path / "export").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert len(files) == 6
    for name in files:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "export" / name).read_bytes(), name
    # exported again into the same folder from a source without a task module, the old task/ goes
    (run / "model_inputs.json").unlink()
    assert export(run, tmp_path / "again")[0]["task"] is None and not (tmp_path / "again" / "task").exists()
    assert source.kind == "fine-tuning" and list(config["sensors"]) == ["sar+s2"]
    assert config["sensors"]["sar+s2"]["bands"] == ["VV", "VH", *get_sensor("s2").bands]
    ours = load_backbone(tmp_path / "export", sensors=["sar+s2"])
    x = torch.randn(2, 14, 32, 32, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        expected = model.backbone.forward_features(x, "sar+s2")
        assert (ours.forward_features(x) - expected).abs().max() < TOL
