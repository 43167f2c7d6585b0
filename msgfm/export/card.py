"""The model card (``README.md``) of an export, written from its config.json only."""
from __future__ import annotations

from typing import Any


def _fmt(values: list[Any]) -> str:
    return ", ".join("-" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def model_card(config: dict[str, Any]) -> str:
    """Markdown: what the model is, its inputs band by band, how to load it, where it came from."""
    arch, prov = config["architecture"], config["provenance"]
    moe = arch["moe"]
    moe_text = "dense (no experts)" if moe is None else \
        f"{moe['num_experts']} experts, top-1, in stage/blocks {moe['blocks']}"
    sensors = list(config["sensors"])
    lines = [
        f"# msGFM backbone ({', '.join(sensors)})", "",
        "A multisensor geospatial foundation model (msGFM, Han et al., CVPR 2024) exported by msgfm.", "",
        "## Architecture", "",
        f"Swin encoder: image {arch['img_size']} px, patch {arch['patch_size']}, window {arch['window_size']}, "
        f"embed dim {arch['embed_dim']}, depths {arch['depths']}, heads {arch['num_heads']}; MoE: {moe_text}. "
        f"{config['weights']['parameters']:,} parameters in `{config['weights']['file']}`.", "",
        "## Inputs", "",
    ]
    for name, entry in config["sensors"].items():
        lines += [f"### {name}", "", entry["description"], "",
                  f"Units: {entry['units']}; the model input is {entry['input']}.", "",
                  "| band | centre wavelength (nm) |", "|---|---|"]
        lines += [f"| {b} | {_fmt([w])} |" for b, w in zip(entry["bands"], entry["wavelengths_nm"])]
        lines.append("")
        for norm in entry["normalization"]:
            lines += [f"Normalization of data group(s) {', '.join(norm['groups'])}: mean {_fmt(norm['mean'])}; "
                      f"std {_fmt(norm['std'])}.", ""]
        if not entry["normalization"]:
            lines += ["No normalization statistics were recorded with this model.", ""]
        if entry["storage"]:
            for part, groups in entry["storage"].items():
                for group, s in groups.items():
                    lines.append(f"Stored as {s['dtype']} in group {group} ({part}): physical = value * "
                                 f"{s['scale']:g} + {s['offset']:g}, nodata {s['nodata']}.")
            lines.append("")
    first = sensors[0]
    lines += [
        "## Use", "",
        "```python",
        "import msgfm",
        f"backbone = msgfm.load_backbone('.', sensors=['{first}'])   # plain torch, no DeepSpeed",
        "import timm",
        f"features = timm.create_model('msgfm_swin', pretrained=True, sensors=['{first}'], features_only=True,",
        "                             pretrained_cfg_overlay={'file': 'model.safetensors'})",
        "```", "",
        "TerraTorch: `backbone: msgfm_swin` with `backbone_ckpt_path` set to this folder (docs/export.md of msgfm).",
        "",
    ]
    task = config.get("task")
    if task:
        lines += [f"Fine-tuned for task `{task['name']}`: `{task['folder']}/` holds the whole task module "
                  f"(`{task['weights']}`) with its config and inputs; `msgfm predict --model <this folder> "
                  f"--task {task['name']} ...` maps a scene with it.", ""]
    lines += [
        "## Provenance", "",
        f"- {prov['kind']} checkpoint `{prov['checkpoint']}`, step {prov['step']}, config hash "
        f"`{prov['config_hash']}`, trained with msgfm commit `{prov['trained_with_commit']}`",
        f"- exported by msgfm {prov['exported_by']['msgfm_version']} (commit "
        f"`{prov['exported_by']['git_commit']}`)",
    ]
    lines += [f"- note: {note}" for note in prov["notes"]]
    return "\n".join(lines) + "\n"
