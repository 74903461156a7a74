"""The conversation engine: sessions, turn-taking, barge-in and the batched scheduler loop."""
