"""lmserve model package."""
