"""`python -m supermachine_kernel …` = the `supermachine-kernel` command."""
import sys

from .cli import main

sys.exit(main())
