"""Shared code of the language-neuron pipeline (detection, deactivation, training, evaluation)."""
