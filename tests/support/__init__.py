"""What the tests share: tiny models, kernel availability, a live server."""
