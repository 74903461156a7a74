"""The SpeechGPT 2.0 streaming RVQ codec (24 kHz audio <-> 3 x 25 Hz token streams).

Public API::

    codec = load_codec(ckpt_path, config_path, device="cpu", dtype=torch.float32)
    tokens = codec.encode(audio)                # (B, 1, N) -> (3, B, T)
    audio = codec.decode(tokens)                # (3, B, T) -> (B, 1, T * 960)
    enc = codec.streaming_encoder(num_slots=S)  # enc.reset(slots); enc.step(audio, slots=None)
    dec = codec.streaming_decoder(num_slots=S)  # dec.reset(slots); dec.step(tokens, slots=None)
"""

import torch

from .checkpoint import (
    CodecCheckpointError,
    build_random_codec_checkpoint,
    load_state_dict_file,
    released_shapes,
    save_codec_checkpoint,
)
from .codec import SG2Codec, load_codec
from .config import CodecConfig, CodecConfigError
from .streaming import StreamingDecoder, StreamingEncoder


def build_random_codec(
    config: CodecConfig,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SG2Codec:
    """A codec with random weights for `config`, built in memory (same path as a real checkpoint)."""
    return load_codec(build_random_codec_checkpoint(config, seed), config, device=device, dtype=dtype)


__all__ = [
    "CodecCheckpointError",
    "CodecConfig",
    "CodecConfigError",
    "SG2Codec",
    "StreamingDecoder",
    "StreamingEncoder",
    "build_random_codec",
    "build_random_codec_checkpoint",
    "load_codec",
    "load_state_dict_file",
    "released_shapes",
    "save_codec_checkpoint",
]
