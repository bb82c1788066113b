"""Database access. Functions take an AsyncSession and return SDK models, never rows."""
