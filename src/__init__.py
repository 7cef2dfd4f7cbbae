"""VT-PTQ: MindSpore implementation of post-training quantization for vision transformers."""
