"""Pure machine-learning code for the model registry: ONNX export, optimisation, evaluation.

Nothing here touches Django: the Celery tasks load rows and artifacts, call these
functions with arrays and bytes, and store what they return. torch and onnx are imported
inside the functions that need them, so importing this package stays light.
"""
