"""Capture: the model map, tensor metrics, sampling and the Recorder that owns every hook."""
