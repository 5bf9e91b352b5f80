"""Write adapter files of every algorithm deterministically and print a content digest of each.

A refactor that must not change what is written (issue 15: "files written before and after the
change are identical") runs this before and after and diffs the output:

    .venv/bin/python scripts/file_digests.py > before.txt      # on the old commit (a git worktree)
    .venv/bin/python scripts/file_digests.py > after.txt
    diff before.txt after.txt

The digest covers a safetensors file's metadata (sorted) and every tensor's name, dtype, shape and
bytes: safetensors writes its metadata map in a random order, so raw file bytes differ run to run.
Set GOLDEN_DIR to keep the files.
"""

import hashlib
import tempfile
from pathlib import Path

import torch

from higanbana.formats import save_network
from higanbana.formats.sd_network import save_sd_network, sd_network
from higanbana.models.tiny import tiny_sd_parts

SETUPS = {
    "lora": ("lora", {"rank": 4}),
    "lora-tucker": ("lora", {"rank": 4, "use_tucker": True}),
    "lora-rs": ("lora", {"rank": 4, "alpha": 2, "rs_lora": True}),
    "lora-scalar": ("lora", {"rank": 4, "use_scalar": True}),
    "dora": ("lora", {"rank": 4, "weight_decompose": True}),
    "dora-in": ("lora", {"rank": 4, "weight_decompose": True, "wd_on_output": False}),
    "loha": ("loha", {"rank": 4}),
    "loha-tucker": ("loha", {"rank": 4, "use_tucker": True}),
    "loha-dora": ("loha", {"rank": 4, "weight_decompose": True}),
    "lokr": ("lokr", {"rank": 4, "factor": 4}),
    "lokr-both": ("lokr", {"rank": 2, "factor": 4, "decompose_both": True}),
    "lokr-full": ("lokr", {"rank": 4, "factor": 4, "full_matrix": True}),
    "lokr-tucker": ("lokr", {"rank": 2, "factor": 4, "use_tucker": True}),
    "lokr-unbal": ("lokr", {"rank": 2, "factor": 4, "unbalanced_factorization": True}),
    "lokr-dora": ("lokr", {"rank": 2, "factor": 4, "weight_decompose": True}),
    "ia3": ("ia3", {}),
    "glora": ("glora", {"rank": 4}),
    "oft": ("oft", {"rank": 4}),
    "oft-rescaled": ("oft", {"rank": 4, "rescaled": True, "constraint": 1e-3}),
    "boft": ("boft", {"rank": 4}),
    "boft-2": ("boft", {"rank": 2, "boft_stages": 2}),
    "full": ("full", {}),
}


def digest(path: Path) -> str:
    """sha256 of a file's content: the bytes of JSON files, and for safetensors its metadata (sorted) and
    every tensor's name, dtype, shape and bytes — safetensors writes the metadata map in a random order."""
    if path.suffix != ".safetensors":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    import json

    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        h.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for key in sorted(f.keys()):
            t = f.get_tensor(key)
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def main(out: Path) -> None:
    from higanbana.formats import export_peft

    lines = []
    for kind in ("sd1", "sdxl"):
        parts = tiny_sd_parts(kind, seed=0)
        for label, (algo, options) in SETUPS.items():
            torch.manual_seed(1)
            preset = "full" if kind == "sd1" else "attn-mlp"
            net = sd_network(parts, preset, algo, **options)
            g = torch.Generator().manual_seed(2)
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
            files = [
                save_network(net, out / f"{kind}-{label}.safetensors"),
                save_sd_network(
                    net,
                    out / f"{kind}-{label}-sd.safetensors",
                    kind,
                    dtype=torch.float16,
                    metadata={"modelspec.date": "2026-01-01T00:00:00"},
                ),
            ]
            if algo in ("lora", "loha", "lokr") and "wd_on_output" not in options and "use_tucker" not in options:
                try:
                    files += list((export_peft(net, out / f"{kind}-{label}-peft", part="lora_unet")).iterdir())
                except Exception as exc:  # a refusal is part of the record: its message is compared too
                    lines.append(f"{kind}-{label}-peft: refused {type(exc).__name__}: {exc}")
            net.detach()
            for f in files:
                lines.append(f"{f.relative_to(out)} {digest(f)}")
    norms = tiny_sd_parts("sd1", seed=0)
    torch.manual_seed(1)
    net = sd_network(norms, {"preset": "attn-mlp", "train_norm": True}, "lora", rank=2)
    f = save_network(net, out / "sd1-lora-norm.safetensors")
    lines.append(f"{f.relative_to(out)} {digest(f)}")
    print("\n".join(sorted(lines)))


if __name__ == "__main__":
    import os

    out = Path(os.environ.get("GOLDEN_DIR") or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    main(out)
