"""Small GenMask experiments on synthetic data (the demo and the paper's findings at small scale)."""
