"""Files: adapter networks to safetensors and back (ours, kohya, LyCORIS, PEFT/diffusers), their
validation, metadata and tool verdicts, and whole SD checkpoints. Sits above :mod:`higanbana.network`."""

from .network_files import load_network, network_from_records, network_metadata, network_tensors, save_network
from .peft import export_peft, write_peft
from .safetensors_io import FORMAT_VERSION, load_tensors, save_tensors

__all__ = [
    "FORMAT_VERSION",
    "export_peft",
    "load_network",
    "load_tensors",
    "network_from_records",
    "network_metadata",
    "network_tensors",
    "save_network",
    "save_tensors",
    "write_peft",
]
