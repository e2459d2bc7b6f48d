"""A restaurant waitlist service that broadcasts every change to the restaurant's devices.

Run it from the repository root with ``python -m examples.restaurant_app --demo``; see README.md.
"""

from .app import DEMO_RESTAURANT_ID, create_app
from .config import Settings

__all__ = ["DEMO_RESTAURANT_ID", "Settings", "create_app"]
