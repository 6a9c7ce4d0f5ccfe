"""The embedded default, under its old single-module name: the digits data (``data.py``), the
digits teacher (``teacher.py``), the digits classifier (``classifier.py``) and their files
(``files.py``). A thin re-export: ``pid_fast.digits`` (0.1's path) forwards here, and
``pid-fast train-teacher`` / ``train-features`` are documented with these names."""

from pid_fast.demo.classifier import DigitsClassifier, classifier_accuracy, load_classifier, train_classifier
from pid_fast.demo.data import DIGITS_RESOLUTION, digits_split, load_digits
from pid_fast.demo.files import ASSETS_DIR, DEFAULT_FEATURES, DEFAULT_TEACHER, checkpoint_recipe
from pid_fast.demo.teacher import DIGITS_NETWORK, edm_loss, load_digits_teacher, train_teacher

__all__ = [
    "ASSETS_DIR", "DEFAULT_TEACHER", "DEFAULT_FEATURES", "DIGITS_RESOLUTION", "DIGITS_NETWORK", "load_digits",
    "digits_split", "edm_loss", "train_teacher", "load_digits_teacher", "DigitsClassifier", "train_classifier",
    "load_classifier", "classifier_accuracy", "checkpoint_recipe",
]
