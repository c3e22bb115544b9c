"""Teacher-forced scoring: token logprobs of given text, target PPL, sliding windows."""
