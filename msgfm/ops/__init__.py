"""Hot ops of the Swin encoder with an implementation switch: eager, sdpa, fused."""
from msgfm.ops.window_attention import FusedUnavailableError, resolve_attention_impl, window_attention
from msgfm.ops.window_process import resolve_window_process_impl, window_merge, window_partition

__all__ = [
    "FusedUnavailableError",
    "resolve_attention_impl",
    "resolve_window_process_impl",
    "window_attention",
    "window_merge",
    "window_partition",
]
