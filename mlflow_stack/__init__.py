"""mlflow-stack: provision an MLflow demo platform over SSH and drive the ML work on it."""
