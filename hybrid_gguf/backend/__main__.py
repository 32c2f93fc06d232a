import sys

from hybrid_gguf.backend import main

sys.exit(main())
