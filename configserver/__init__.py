"""The configuration server: the control plane."""
