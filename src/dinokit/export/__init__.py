"""Deployment exports of DINOv2 backbones (ONNX)."""
