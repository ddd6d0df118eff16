import sys

from rlhf.evaluation.evaluate import main

sys.exit(main())
