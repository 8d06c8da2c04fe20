import sys

from mmhpc.launch.main import main

sys.exit(main())
