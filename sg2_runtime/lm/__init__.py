"""The SpeechGPT 2.0 speech-text language model: loading, prompt format, batched incremental decoding."""

from .config import LMConfig, LMConfigError, preset_config
from .greetings import Greeting, GreetingError, choose_greeting, load_greetings, validate_greeting
from .loading import LMCheckpointError, expected_shapes, load_weights
from .model import SG2Model
from .prompt import PromptFormat, Reply, UserSpeechStream, pad_user_audio
from .random_model import write_random_model_dir
from .runtime import SG2LM, CapacityError, LMSession, LMStateError, StepOutput, load_lm
from .sampling import SamplingParams
from .tokens import SpecialTokens, TokenizerError, resolve_special_tokens

__all__ = [
    "SG2LM",
    "CapacityError",
    "Greeting",
    "GreetingError",
    "LMCheckpointError",
    "LMConfig",
    "LMConfigError",
    "LMSession",
    "LMStateError",
    "PromptFormat",
    "Reply",
    "SG2Model",
    "SamplingParams",
    "SpecialTokens",
    "StepOutput",
    "TokenizerError",
    "UserSpeechStream",
    "choose_greeting",
    "expected_shapes",
    "load_greetings",
    "load_lm",
    "load_weights",
    "pad_user_audio",
    "preset_config",
    "resolve_special_tokens",
    "validate_greeting",
    "write_random_model_dir",
]
