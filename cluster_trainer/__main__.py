import sys

from cluster_trainer.cli import main

sys.exit(main())
