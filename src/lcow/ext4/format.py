"""ext4 on-disk structures, flags and constants.

References: the Linux kernel's ext4 disk-layout documentation
(Documentation/filesystems/ext4/, "ext4 Data Structures and Algorithms") and the kernel
header fs/ext4/ext4.h, whose field names are used verbatim here. Every structure is
little-endian. This module holds declarations only; the writer and reader hold the logic.
"""

import enum
import struct
from typing import Final

BLOCK_SIZE_BYTES: Final = 4096
LOG_BLOCK_SIZE: Final = 2  # s_log_block_size: block size = 1024 << 2
INODE_SIZE_BYTES: Final = 256
GOOD_OLD_INODE_SIZE_BYTES: Final = 128
EXTRA_ISIZE_BYTES: Final = 32  # i_extra_isize: covers the fields up to i_projid

# A block bitmap is one block, so a group has at most 8 * block size blocks and inodes.
BLOCKS_PER_GROUP: Final = 8 * BLOCK_SIZE_BYTES
MAX_INODES_PER_GROUP: Final = 8 * BLOCK_SIZE_BYTES
INODES_PER_BLOCK: Final = BLOCK_SIZE_BYTES // INODE_SIZE_BYTES

SUPERBLOCK_OFFSET_BYTES: Final = 1024
SUPERBLOCK_SIZE_BYTES: Final = 1024
EXT4_SUPER_MAGIC: Final = 0xEF53

# Reserved inode numbers (fs/ext4/ext4.h).
EXT4_BAD_INO: Final = 1
EXT4_ROOT_INO: Final = 2
EXT4_GOOD_OLD_FIRST_INO: Final = 11  # the first inode not reserved; mke2fs puts lost+found here

EXT4_NAME_LEN: Final = 255
EXT4_LINK_MAX: Final = 65000  # above this, dir_nlink directories store i_links_count = 1

# Seconds range of an ext4 timestamp with the two epoch bits: a signed 32-bit value plus
# an extension of 0..3 times 2**32, that is 1901-12-13T20:45:52Z to 2446-05-10T22:38:55Z.
EXT4_TIMESTAMP_MIN_S: Final = -(2**31)
EXT4_TIMESTAMP_MAX_S: Final = 2**34 - 2**31 - 1
EXT4_EPOCH_BITS: Final = 2
EXT4_EPOCH_MASK: Final = (1 << EXT4_EPOCH_BITS) - 1
EXT4_NSEC_MASK: Final = ~EXT4_EPOCH_MASK & 0xFFFFFFFF


class FeatureCompat(enum.IntFlag):
    """s_feature_compat."""

    DIR_PREALLOC = 0x1
    IMAGIC_INODES = 0x2
    HAS_JOURNAL = 0x4
    EXT_ATTR = 0x8
    RESIZE_INODE = 0x10
    DIR_INDEX = 0x20
    SPARSE_SUPER2 = 0x200


class FeatureIncompat(enum.IntFlag):
    """s_feature_incompat."""

    COMPRESSION = 0x1
    FILETYPE = 0x2
    RECOVER = 0x4
    JOURNAL_DEV = 0x8
    META_BG = 0x10
    EXTENTS = 0x40
    INCOMPAT_64BIT = 0x80
    MMP = 0x100
    FLEX_BG = 0x200
    EA_INODE = 0x400
    DIRDATA = 0x1000
    CSUM_SEED = 0x2000
    LARGEDIR = 0x4000
    INLINE_DATA = 0x8000
    ENCRYPT = 0x10000
    CASEFOLD = 0x20000


class FeatureRoCompat(enum.IntFlag):
    """s_feature_ro_compat."""

    SPARSE_SUPER = 0x1
    LARGE_FILE = 0x2
    BTREE_DIR = 0x4
    HUGE_FILE = 0x8
    GDT_CSUM = 0x10
    DIR_NLINK = 0x20
    EXTRA_ISIZE = 0x40
    QUOTA = 0x100
    BIGALLOC = 0x200
    METADATA_CSUM = 0x400
    READONLY = 0x1000
    PROJECT = 0x2000
    VERITY = 0x8000


class SuperFlags(enum.IntFlag):
    """s_flags."""

    SIGNED_HASH = 0x1
    UNSIGNED_HASH = 0x2
    TEST_FILESYS = 0x4


class FsState(enum.IntEnum):
    """s_state."""

    VALID_FS = 0x1
    ERROR_FS = 0x2
    ORPHAN_FS = 0x4


class ErrorsBehaviour(enum.IntEnum):
    """s_errors."""

    CONTINUE = 1
    RO = 2
    PANIC = 3


class BgFlags(enum.IntFlag):
    """bg_flags of a group descriptor."""

    INODE_UNINIT = 0x1
    BLOCK_UNINIT = 0x2
    INODE_ZEROED = 0x4


class InodeFlags(enum.IntFlag):
    """i_flags."""

    SECRM = 0x1
    UNRM = 0x2
    COMPR = 0x4
    SYNC = 0x8
    IMMUTABLE = 0x10
    APPEND = 0x20
    NODUMP = 0x40
    NOATIME = 0x80
    INDEX = 0x1000
    HUGE_FILE = 0x40000
    EXTENTS = 0x80000
    EA_INODE = 0x200000
    INLINE_DATA = 0x10000000


class FileType(enum.IntEnum):
    """file_type of a directory entry (ext4_dir_entry_2)."""

    UNKNOWN = 0
    REG_FILE = 1
    DIR = 2
    CHRDEV = 3
    BLKDEV = 4
    FIFO = 5
    SOCK = 6
    SYMLINK = 7


class XattrIndex(enum.IntEnum):
    """e_name_index: the prefix an xattr name was stored without."""

    USER = 1
    POSIX_ACL_ACCESS = 2
    POSIX_ACL_DEFAULT = 3
    TRUSTED = 4
    LUSTRE = 5
    SECURITY = 6
    SYSTEM = 7
    RICHACL = 8


# Prefixes in the order the kernel's ext4_xattr_handler_map matches them: the two ACL names
# are whole names, so they must be tried before the general "system." prefix.
XATTR_PREFIXES: Final[tuple[tuple[bytes, XattrIndex], ...]] = (
    (b"system.posix_acl_access", XattrIndex.POSIX_ACL_ACCESS),
    (b"system.posix_acl_default", XattrIndex.POSIX_ACL_DEFAULT),
    (b"user.", XattrIndex.USER),
    (b"trusted.", XattrIndex.TRUSTED),
    (b"security.", XattrIndex.SECURITY),
    (b"system.", XattrIndex.SYSTEM),
)

S_IFMT: Final = 0o170000
S_IFSOCK: Final = 0o140000
S_IFLNK: Final = 0o120000
S_IFREG: Final = 0o100000
S_IFBLK: Final = 0o060000
S_IFDIR: Final = 0o040000
S_IFCHR: Final = 0o020000
S_IFIFO: Final = 0o010000

FILE_TYPE_BY_MODE: Final[dict[int, FileType]] = {
    S_IFREG: FileType.REG_FILE,
    S_IFDIR: FileType.DIR,
    S_IFCHR: FileType.CHRDEV,
    S_IFBLK: FileType.BLKDEV,
    S_IFIFO: FileType.FIFO,
    S_IFSOCK: FileType.SOCK,
    S_IFLNK: FileType.SYMLINK,
}

# struct ext4_super_block, little-endian. Fields are listed in on-disk order with their
# offsets; the reserved tail up to s_checksum is padding.
SUPERBLOCK_FIELDS: Final[tuple[tuple[str, str], ...]] = (
    ("s_inodes_count", "I"),  # 0x0
    ("s_blocks_count_lo", "I"),  # 0x4
    ("s_r_blocks_count_lo", "I"),  # 0x8
    ("s_free_blocks_count_lo", "I"),  # 0xC
    ("s_free_inodes_count", "I"),  # 0x10
    ("s_first_data_block", "I"),  # 0x14
    ("s_log_block_size", "I"),  # 0x18
    ("s_log_cluster_size", "I"),  # 0x1C
    ("s_blocks_per_group", "I"),  # 0x20
    ("s_clusters_per_group", "I"),  # 0x24
    ("s_inodes_per_group", "I"),  # 0x28
    ("s_mtime", "I"),  # 0x2C
    ("s_wtime", "I"),  # 0x30
    ("s_mnt_count", "H"),  # 0x34
    ("s_max_mnt_count", "h"),  # 0x36
    ("s_magic", "H"),  # 0x38
    ("s_state", "H"),  # 0x3A
    ("s_errors", "H"),  # 0x3C
    ("s_minor_rev_level", "H"),  # 0x3E
    ("s_lastcheck", "I"),  # 0x40
    ("s_checkinterval", "I"),  # 0x44
    ("s_creator_os", "I"),  # 0x48
    ("s_rev_level", "I"),  # 0x4C
    ("s_def_resuid", "H"),  # 0x50
    ("s_def_resgid", "H"),  # 0x52
    ("s_first_ino", "I"),  # 0x54
    ("s_inode_size", "H"),  # 0x58
    ("s_block_group_nr", "H"),  # 0x5A
    ("s_feature_compat", "I"),  # 0x5C
    ("s_feature_incompat", "I"),  # 0x60
    ("s_feature_ro_compat", "I"),  # 0x64
    ("s_uuid", "16s"),  # 0x68
    ("s_volume_name", "16s"),  # 0x78
    ("s_last_mounted", "64s"),  # 0x88
    ("s_algorithm_usage_bitmap", "I"),  # 0xC8
    ("s_prealloc_blocks", "B"),  # 0xCC
    ("s_prealloc_dir_blocks", "B"),  # 0xCD
    ("s_reserved_gdt_blocks", "H"),  # 0xCE
    ("s_journal_uuid", "16s"),  # 0xD0
    ("s_journal_inum", "I"),  # 0xE0
    ("s_journal_dev", "I"),  # 0xE4
    ("s_last_orphan", "I"),  # 0xE8
    ("s_hash_seed", "16s"),  # 0xEC
    ("s_def_hash_version", "B"),  # 0xFC
    ("s_jnl_backup_type", "B"),  # 0xFD
    ("s_desc_size", "H"),  # 0xFE
    ("s_default_mount_opts", "I"),  # 0x100
    ("s_first_meta_bg", "I"),  # 0x104
    ("s_mkfs_time", "I"),  # 0x108
    ("s_jnl_blocks", "68s"),  # 0x10C
    ("s_blocks_count_hi", "I"),  # 0x150
    ("s_r_blocks_count_hi", "I"),  # 0x154
    ("s_free_blocks_count_hi", "I"),  # 0x158
    ("s_min_extra_isize", "H"),  # 0x15C
    ("s_want_extra_isize", "H"),  # 0x15E
    ("s_flags", "I"),  # 0x160
    ("s_raid_stride", "H"),  # 0x164
    ("s_mmp_interval", "H"),  # 0x166
    ("s_mmp_block", "Q"),  # 0x168
    ("s_raid_stripe_width", "I"),  # 0x170
    ("s_log_groups_per_flex", "B"),  # 0x174
    ("s_checksum_type", "B"),  # 0x175
    ("s_encryption_level", "B"),  # 0x176
    ("s_reserved_pad", "B"),  # 0x177
    ("s_kbytes_written", "Q"),  # 0x178
    ("s_snapshot_inum", "I"),  # 0x180
    ("s_snapshot_id", "I"),  # 0x184
    ("s_snapshot_r_blocks_count", "Q"),  # 0x188
    ("s_snapshot_list", "I"),  # 0x190
    ("s_error_count", "I"),  # 0x194
    ("s_first_error_time", "I"),  # 0x198
    ("s_first_error_ino", "I"),  # 0x19C
    ("s_first_error_block", "Q"),  # 0x1A0
    ("s_first_error_func", "32s"),  # 0x1A8
    ("s_first_error_line", "I"),  # 0x1C8
    ("s_last_error_time", "I"),  # 0x1CC
    ("s_last_error_ino", "I"),  # 0x1D0
    ("s_last_error_line", "I"),  # 0x1D4
    ("s_last_error_block", "Q"),  # 0x1D8
    ("s_last_error_func", "32s"),  # 0x1E0
    ("s_mount_opts", "64s"),  # 0x200
    ("s_usr_quota_inum", "I"),  # 0x240
    ("s_grp_quota_inum", "I"),  # 0x244
    ("s_overhead_clusters", "I"),  # 0x248
    ("s_backup_bgs", "8s"),  # 0x24C
    ("s_encrypt_algos", "4s"),  # 0x254
    ("s_encrypt_pw_salt", "16s"),  # 0x258
    ("s_lpf_ino", "I"),  # 0x268
    ("s_prj_quota_inum", "I"),  # 0x26C
    ("s_checksum_seed", "I"),  # 0x270
    ("s_wtime_hi", "B"),  # 0x274
    ("s_mtime_hi", "B"),  # 0x275
    ("s_mkfs_time_hi", "B"),  # 0x276
    ("s_lastcheck_hi", "B"),  # 0x277
    ("s_first_error_time_hi", "B"),  # 0x278
    ("s_last_error_time_hi", "B"),  # 0x279
    ("s_first_error_errcode", "B"),  # 0x27A
    ("s_last_error_errcode", "B"),  # 0x27B
    ("s_encoding", "H"),  # 0x27C
    ("s_encoding_flags", "H"),  # 0x27E
    ("s_orphan_file_inum", "I"),  # 0x280
    ("s_reserved", "376s"),  # 0x284: 94 reserved 32-bit words
    ("s_checksum", "I"),  # 0x3FC: crc32c of the bytes before it
)
SUPERBLOCK: Final = struct.Struct("<" + "".join(code for _, code in SUPERBLOCK_FIELDS))
assert SUPERBLOCK.size == SUPERBLOCK_SIZE_BYTES
SUPERBLOCK_CHECKSUM_OFFSET: Final = 0x3FC
EXT4_CRC32C_CHKSUM: Final = 1  # s_checksum_type
EXT4_OS_LINUX: Final = 0
EXT4_DYNAMIC_REV: Final = 1
EXT4_DEFM_XATTR_USER: Final = 0x4
EXT4_DEFM_ACL: Final = 0x8
DX_HASH_HALF_MD4: Final = 1

# struct ext4_group_desc without the 64bit feature: 32 bytes, little-endian.
GROUP_DESC_FIELDS: Final[tuple[tuple[str, str], ...]] = (
    ("bg_block_bitmap_lo", "I"),
    ("bg_inode_bitmap_lo", "I"),
    ("bg_inode_table_lo", "I"),
    ("bg_free_blocks_count_lo", "H"),
    ("bg_free_inodes_count_lo", "H"),
    ("bg_used_dirs_count_lo", "H"),
    ("bg_flags", "H"),
    ("bg_exclude_bitmap_lo", "I"),
    ("bg_block_bitmap_csum_lo", "H"),
    ("bg_inode_bitmap_csum_lo", "H"),
    ("bg_itable_unused_lo", "H"),
    ("bg_checksum", "H"),
)
GROUP_DESC: Final = struct.Struct("<" + "".join(code for _, code in GROUP_DESC_FIELDS))
assert GROUP_DESC.size == 32
GROUP_DESC_CHECKSUM_OFFSET: Final = 0x1E
GROUP_DESCS_PER_BLOCK: Final = BLOCK_SIZE_BYTES // GROUP_DESC.size

# struct ext4_inode, little-endian: the 128-byte base inode, then the extra fields that
# i_extra_isize = 32 covers. The in-inode xattr area follows, up to the inode size.
INODE_FIELDS: Final[tuple[tuple[str, str], ...]] = (
    ("i_mode", "H"),  # 0x0
    ("i_uid", "H"),  # 0x2
    ("i_size_lo", "I"),  # 0x4
    ("i_atime", "I"),  # 0x8
    ("i_ctime", "I"),  # 0xC
    ("i_mtime", "I"),  # 0x10
    ("i_dtime", "I"),  # 0x14
    ("i_gid", "H"),  # 0x18
    ("i_links_count", "H"),  # 0x1A
    ("i_blocks_lo", "I"),  # 0x1C
    ("i_flags", "I"),  # 0x20
    ("l_i_version", "I"),  # 0x24
    ("i_block", "60s"),  # 0x28
    ("i_generation", "I"),  # 0x64
    ("i_file_acl_lo", "I"),  # 0x68
    ("i_size_high", "I"),  # 0x6C
    ("i_obso_faddr", "I"),  # 0x70
    ("l_i_blocks_high", "H"),  # 0x74
    ("l_i_file_acl_high", "H"),  # 0x76
    ("l_i_uid_high", "H"),  # 0x78
    ("l_i_gid_high", "H"),  # 0x7A
    ("l_i_checksum_lo", "H"),  # 0x7C
    ("l_i_reserved", "H"),  # 0x7E
    ("i_extra_isize", "H"),  # 0x80
    ("i_checksum_hi", "H"),  # 0x82
    ("i_ctime_extra", "I"),  # 0x84
    ("i_mtime_extra", "I"),  # 0x88
    ("i_atime_extra", "I"),  # 0x8C
    ("i_crtime", "I"),  # 0x90
    ("i_crtime_extra", "I"),  # 0x94
    ("i_version_hi", "I"),  # 0x98
    ("i_projid", "I"),  # 0x9C
)
INODE: Final = struct.Struct("<" + "".join(code for _, code in INODE_FIELDS))
assert INODE.size == GOOD_OLD_INODE_SIZE_BYTES + EXTRA_ISIZE_BYTES
INODE_CHECKSUM_LO_OFFSET: Final = 0x7C
INODE_CHECKSUM_HI_OFFSET: Final = 0x82
INODE_BLOCK_OFFSET: Final = 0x28
INODE_BLOCK_SIZE_BYTES: Final = 60
# The in-inode xattr area: after the extra fields, up to the end of the inode.
INODE_XATTR_OFFSET: Final = GOOD_OLD_INODE_SIZE_BYTES + EXTRA_ISIZE_BYTES
INODE_XATTR_SPACE_BYTES: Final = INODE_SIZE_BYTES - INODE_XATTR_OFFSET

# Extent tree nodes (fs/ext4/ext4_extents.h), little-endian, 12 bytes each.
EXT4_EXT_MAGIC: Final = 0xF30A
EXTENT_HEADER: Final = struct.Struct(
    "<HHHHI"
)  # eh_magic, eh_entries, eh_max, eh_depth, eh_generation
EXTENT: Final = struct.Struct("<IHHI")  # ee_block, ee_len, ee_start_hi, ee_start_lo
EXTENT_INDEX: Final = struct.Struct("<IIHH")  # ei_block, ei_leaf_lo, ei_leaf_hi, ei_unused
EXTENT_TAIL: Final = struct.Struct("<I")  # et_checksum, right after eh_max entries
assert EXTENT_HEADER.size == EXTENT.size == EXTENT_INDEX.size == 12
EXT_INIT_MAX_LEN: Final = 1 << 15  # an initialized extent covers at most 32768 blocks
EXT_MAX_DEPTH: Final = 5  # the kernel rejects deeper trees (EXT4_MAX_EXTENT_DEPTH)
INODE_EXTENT_SLOTS: Final = (INODE_BLOCK_SIZE_BYTES - EXTENT_HEADER.size) // EXTENT.size
BLOCK_EXTENT_SLOTS: Final = (
    BLOCK_SIZE_BYTES - EXTENT_HEADER.size - EXTENT_TAIL.size
) // EXTENT.size
assert INODE_EXTENT_SLOTS == 4
assert BLOCK_EXTENT_SLOTS == 340

# Directory entries (ext4_dir_entry_2) and the checksum tail of each leaf block.
DIR_ENTRY_HEADER: Final = struct.Struct("<IHBB")  # inode, rec_len, name_len, file_type
DIR_ENTRY_TAIL: Final = struct.Struct(
    "<IHBBI"
)  # det_reserved_zero1, det_rec_len, zero2, ft, det_checksum
assert DIR_ENTRY_HEADER.size == 8
assert DIR_ENTRY_TAIL.size == 12
EXT4_DIR_TAIL_FILE_TYPE: Final = 0xDE  # det_reserved_ft marks the tail as a fake entry

# Extended attributes (fs/ext4/xattr.h), little-endian.
EXT4_XATTR_MAGIC: Final = 0xEA020000
XATTR_BLOCK_HEADER: Final = struct.Struct("<IIII I 12s")
# h_magic, h_refcount, h_blocks, h_hash, h_checksum, h_reserved
assert XATTR_BLOCK_HEADER.size == 32
XATTR_BLOCK_CHECKSUM_OFFSET: Final = 0x10
XATTR_INODE_HEADER: Final = struct.Struct("<I")  # h_magic, at the start of the in-inode area
XATTR_ENTRY: Final = struct.Struct("<BBHIII")
# e_name_len, e_name_index, e_value_offs, e_value_inum, e_value_size, e_hash
assert XATTR_ENTRY.size == 16
XATTR_ROUND: Final = 4  # names and values are padded to 4 bytes
XATTR_VALUE_MAX_BYTES: Final = BLOCK_SIZE_BYTES - XATTR_BLOCK_HEADER.size - XATTR_ENTRY.size - 8

# POSIX ACLs: the VFS xattr form (linux/posix_acl_xattr.h) and ext4's shorter on-disk form
# (fs/ext4/acl.h). Entries for USER_OBJ, GROUP_OBJ, MASK and OTHER carry no id on disk.
POSIX_ACL_XATTR_VERSION: Final = 0x0002
POSIX_ACL_XATTR_HEADER: Final = struct.Struct("<I")
POSIX_ACL_XATTR_ENTRY: Final = struct.Struct("<HHI")  # e_tag, e_perm, e_id
EXT4_ACL_VERSION: Final = 0x0001
EXT4_ACL_HEADER: Final = struct.Struct("<I")
EXT4_ACL_ENTRY: Final = struct.Struct("<HHI")
EXT4_ACL_ENTRY_SHORT: Final = struct.Struct("<HH")
ACL_USER_OBJ: Final = 0x01
ACL_USER: Final = 0x02
ACL_GROUP_OBJ: Final = 0x04
ACL_GROUP: Final = 0x08
ACL_MASK: Final = 0x10
ACL_OTHER: Final = 0x20
