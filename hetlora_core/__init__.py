"""HetLoRA: the algorithm and runtime. No KFP or Kubernetes imports here."""
__version__ = "0.1.0"
