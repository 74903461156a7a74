"""sg2-live runtime: streaming codec, speech-text LM, conversation engine and server for SpeechGPT 2.0-preview."""

__version__ = "0.1.0"
