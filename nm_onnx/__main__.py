import sys

from nm_onnx.cli import main

sys.exit(main())
