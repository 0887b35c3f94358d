"""medcli: MedMNIST from download to trained, evaluated, explained and compared classifiers."""

__version__ = "0.1.0"
