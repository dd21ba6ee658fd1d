"""Write a Chainer list file (``<relative path> <label>`` per line) from a class-folder tree.

    python scripts/make_list.py IMAGENET/train train.txt [--classes classes.txt]

Labels follow ``utils.data.image_folder.scan_class_folders``: the sorted class-folder names
get 0, 1, ...; files are listed class by class in sorted order. ``--classes`` also
writes the folder names, one per line, line k holding class k. Paths are relative to
the tree's root, so read the list back with ``ImageListDataset(list, root=TREE)``.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.data.image_list import write_image_list  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="tree with one folder per class")
    parser.add_argument("list_path", help="list file to write")
    parser.add_argument("--classes", dest="classes_path",
                        help="also write the class-folder names, line k = class k")
    args = parser.parse_args(argv)
    try:
        count = write_image_list(args.root, args.list_path, args.classes_path)
    except (OSError, ValueError) as error:
        parser.exit(1, f"make_list.py: error: {error}\n")
    print(f"wrote {count} entries to {args.list_path}")


if __name__ == "__main__":
    main()
