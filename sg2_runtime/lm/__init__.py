"""The SpeechGPT 2.0 speech-text language model: loading, prompt format, batched incremental decoding."""
