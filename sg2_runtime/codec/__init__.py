"""The SpeechGPT 2.0 streaming RVQ codec (24 kHz audio <-> 3 x 25 Hz token streams)."""
