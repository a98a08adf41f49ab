"""Pictures of models and data, drawn with matplotlib (`plots`: confusion matrices, mistakes, kernels,
activations, Grad-CAM grids, embeddings, reliability, the LR range test's curve, one `save_figure`), and
what a model looks at (`explain`: Grad-CAM through captum, features, channel responses). The final stage
and the report both draw with these."""
