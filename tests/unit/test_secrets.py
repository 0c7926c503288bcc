"""Secrets never show themselves; masking hides known values in any text."""

from mlflow_stack import secrets


def test_secret_hides_value():
    s = secrets.Secret("hunter2-password")
    assert str(s) == secrets.MASK and "hunter2" not in repr(s) and "hunter2" not in f"{s}"
    assert s.reveal() == "hunter2-password"


def test_mask_replaces_every_occurrence():
    s = secrets.generate()
    text = f"url=mysql+pymysql://mlflow:{s.reveal()}@127.0.0.1/mlflow and again {s.reveal()}"
    masked = secrets.mask(text)
    assert s.reveal() not in masked and masked.count(secrets.MASK) == 2


def test_generated_secrets_differ():
    assert secrets.generate().reveal() != secrets.generate().reveal()
