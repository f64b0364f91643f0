"""hnvm: personalized sequential recommendation with HNVM and the paper's baselines."""

__version__ = "0.1.0"
