"""Using a trained model outside the search: the deployable classifier and its ONNX/TorchScript/int8 exports
(`deploy`), and face detection and cropping in photos and videos (`faces`). No trial imports this."""
