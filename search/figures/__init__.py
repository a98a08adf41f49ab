"""Pictures: matplotlib figures of models and data (`plots`), Grad-CAM and feature probes (`explain`), the
search's figures (`trials`), the per-model figures (`models`) and the self-contained report page (`page`)."""
