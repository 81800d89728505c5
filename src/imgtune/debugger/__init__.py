"""The debugger: tensor capture during training, the tensor store and its reader, and rules."""
