import sys

from mmhpc.launch.main import exit_fast, main

exit_fast(main(sys.argv[1:]))
