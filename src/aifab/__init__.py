"""aifab: an AI factory. Raw data in, a served model out, every joule and dollar metered.

Importing this package is cheap: torch and ray are imported only inside the functions that need them.
"""

__version__ = "0.1.0"
