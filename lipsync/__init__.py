"""Command line and configuration for the lip-sync platform. Stages live in pipeline/, training/, ..."""

__version__ = "0.1.0"
