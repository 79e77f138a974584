/*
 * The per-inode work of the ext4 reader and writer, written in C.
 *
 * Reading an inode in Python took about 3.5 us: the checksum over a copy with its checksum
 * fields zeroed, two CRC32C calls, a 32-field struct unpack, four time decodings and the
 * xattr area's probe. Walking an image of 56,000 small files spent 200 ms there, 40 % of
 * exporting it. Here checksums() and decode() do that work in one call each. extent_node()
 * parses a node of an extent tree, inode_runs() finds the data of most files, and
 * dir_entries() parses a directory block. For the writer, pack_inode() encodes an inode
 * and its checksum, which took about 12 % of converting the same layer through struct.
 *
 * The checks and error messages stay in lcow.ext4.reader. These functions return what the
 * bytes contain, or None where a header cannot be parsed, and dir_entries() raises a
 * ValueError whose text the reader's message completes. CRC32C is lcow.crc's, from the crc32c
 * package.
 *
 * Reference: the kernel's ext4 disk-layout documentation and fs/ext4/ext4.h.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define GOOD_OLD_INODE_SIZE 128
#define NS_PER_SECOND 1000000000LL
#define EPOCH_BITS 2
#define EPOCH_MASK ((1U << EPOCH_BITS) - 1)

/* struct ext4_inode offsets. */
#define I_MODE 0x00
#define I_UID 0x02
#define I_SIZE_LO 0x04
#define I_ATIME 0x08
#define I_CTIME 0x0C
#define I_MTIME 0x10
#define I_GID 0x18
#define I_LINKS_COUNT 0x1A
#define I_BLOCKS_LO 0x1C
#define I_FLAGS 0x20
#define I_GENERATION 0x64
#define I_FILE_ACL_LO 0x68
#define I_SIZE_HIGH 0x6C
#define I_BLOCKS_HIGH 0x74
#define I_FILE_ACL_HIGH 0x76
#define I_UID_HIGH 0x78
#define I_GID_HIGH 0x7A
#define I_CHECKSUM_LO 0x7C
#define I_EXTRA_ISIZE 0x80
#define I_CHECKSUM_HI 0x82
#define I_CTIME_EXTRA 0x84
#define I_MTIME_EXTRA 0x88
#define I_ATIME_EXTRA 0x8C
#define I_CRTIME 0x90
#define I_CRTIME_EXTRA 0x94

#define I_BLOCK 0x28
#define I_BLOCK_SIZE 60
#define I_BLOCK_EXTENT_SLOTS 4
#define EXTENTS_FL 0x80000U
#define INLINE_DATA_FL 0x10000000U
#define XATTR_MAGIC 0xEA020000U
#define PACKED_INODE_SIZE 256 /* the inodes lcow writes */
#define PACKED_EXTRA_ISIZE 32
#define PACKED_XATTR_OFFSET (GOOD_OLD_INODE_SIZE + PACKED_EXTRA_ISIZE)
#define DIR_ENTRY_HEADER_SIZE 8
#define EXTENT_MAGIC 0xF30A
#define EXTENT_ENTRY_SIZE 12
#define EXT_INIT_MAX_LEN (1U << 15)

static PyObject *standard_crc32c; /* lcow.crc.crc32c(data, value), taken at import */

/* Read a little-endian field of ``raw``. Bytes past its end read as zeros, as a 128-byte
 * inode's missing extra fields do. */
static uint32_t
field(const unsigned char *raw, Py_ssize_t length, Py_ssize_t offset, int size)
{
    uint32_t value = 0;
    for (int index = size - 1; index >= 0; index--) {
        value <<= 8;
        if (offset + index < length)
            value |= raw[offset + index];
    }
    return value;
}

/* One leaf entry of an extent tree (struct ext4_extent). */
struct extent {
    uint64_t logical;  /* ee_block */
    uint64_t physical; /* ee_start_hi and ee_start_lo */
    uint64_t blocks;   /* ee_len, less 32768 for an unwritten extent */
    int initialized;
};

/* Read the ``index``th entry after the 12-byte header of an extent node. */
static struct extent
read_extent(const unsigned char *node, Py_ssize_t length, uint32_t index)
{
    Py_ssize_t offset = EXTENT_ENTRY_SIZE * (Py_ssize_t)(index + 1);
    struct extent extent = {
        .logical = field(node, length, offset, 4),
        .physical = (uint64_t)field(node, length, offset + 6, 2) << 32
                    | field(node, length, offset + 8, 4),
        .blocks = field(node, length, offset + 4, 2),
        .initialized = 1,
    };

    /* A length above 32768 marks an unwritten extent of length - 32768 blocks. */
    if (extent.blocks > EXT_INIT_MAX_LEN) {
        extent.blocks -= EXT_INIT_MAX_LEN;
        extent.initialized = 0;
    }
    return extent;
}

static int
inode_argument(PyObject *raw, Py_ssize_t inode_size, const unsigned char **bytes)
{
    if (!PyBytes_Check(raw)) {
        PyErr_Format(PyExc_TypeError, "invalid raw inode: expected bytes, got %.100s",
                     Py_TYPE(raw)->tp_name);
        return -1;
    }
    if (inode_size < GOOD_OLD_INODE_SIZE || PyBytes_GET_SIZE(raw) != inode_size) {
        PyErr_Format(PyExc_ValueError, "invalid raw inode: %zd bytes for an inode size of %zd",
                     PyBytes_GET_SIZE(raw), inode_size);
        return -1;
    }
    *bytes = (const unsigned char *)PyBytes_AS_STRING(raw);
    return 0;
}

/*
 * Continue the kernel's raw CRC32C register ``seed`` over the bytes object ``data``. The
 * package gives the standard CRC-32C, which inverts on entry and exit, so both ends are
 * inverted here.
 */
static int
raw_crc32c(PyObject *data, uint64_t seed, uint64_t *result)
{
    PyObject *start = PyLong_FromUnsignedLongLong(~seed & 0xFFFFFFFFULL);
    if (start == NULL)
        return -1;
    PyObject *call_args[2] = {data, start};
    PyObject *standard = PyObject_Vectorcall(standard_crc32c, call_args, 2, NULL);
    Py_DECREF(start);
    if (standard == NULL)
        return -1;
    unsigned long long value = PyLong_AsUnsignedLongLong(standard);
    Py_DECREF(standard);
    if (value == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *result = ~value & 0xFFFFFFFFULL;
    return 0;
}

/*
 * checksums(raw, number, seed, inode_size) -> (stored, computed)
 *
 * ext4_inode_csum(): CRC32C from the filesystem's seed over the inode number and
 * i_generation, then over the inode with its checksum fields read as zeros. Only the low
 * 16 bits count when the inode has no i_checksum_hi.
 */
static PyObject *
checksums(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *raw;
    (void)module;

    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "checksums() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    unsigned long number = PyLong_AsUnsignedLong(args[1]);
    unsigned long seed = PyLong_AsUnsignedLong(args[2]);
    Py_ssize_t inode_size = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred() || inode_argument(args[0], inode_size, &raw) < 0)
        return NULL;

    /* i_checksum_hi counts where i_extra_isize covers it and the inode is long enough. */
    int has_hi = inode_size >= I_CHECKSUM_HI + 2 && field(raw, inode_size, I_EXTRA_ISIZE, 2) >= 4;
    uint32_t stored = field(raw, inode_size, I_CHECKSUM_LO, 2);
    if (has_hi)
        stored |= field(raw, inode_size, I_CHECKSUM_HI, 2) << 16;

    PyObject *covered = PyBytes_FromStringAndSize(NULL, 8 + inode_size);
    if (covered == NULL)
        return NULL;
    unsigned char *data = (unsigned char *)PyBytes_AS_STRING(covered);
    for (int index = 0; index < 4; index++)
        data[index] = (unsigned char)(number >> (8 * index));
    memcpy(data + 4, raw + I_GENERATION, 4);
    memcpy(data + 8, raw, (size_t)inode_size);
    memset(data + 8 + I_CHECKSUM_LO, 0, 2);
    if (has_hi)
        memset(data + 8 + I_CHECKSUM_HI, 0, 2);

    uint64_t computed;
    int status = raw_crc32c(covered, seed, &computed);
    Py_DECREF(covered);
    if (status < 0)
        return NULL;
    if (!has_hi)
        computed &= 0xFFFF;
    return Py_BuildValue("(kK)", (unsigned long)stored, (unsigned long long)computed);
}

/*
 * The ns since the epoch of a signed 32-bit seconds field and its _extra field: 2 epoch
 * bits above the seconds and 30 bits of nanoseconds, which read as 0 when out of range.
 * Past year 2262 the ns do not fit 64 bits, so that rare case goes through Python ints.
 */
static PyObject *
decode_time(uint32_t seconds_field, uint32_t extra)
{
    int64_t seconds = (int64_t)(int32_t)seconds_field;
    int64_t nanoseconds = 0;

    if (extra) {
        seconds += (int64_t)(extra & EPOCH_MASK) << 32;
        nanoseconds = extra >> EPOCH_BITS;
        if (nanoseconds > NS_PER_SECOND - 1)
            nanoseconds = 0;
    }
    if (seconds <= (INT64_MAX - nanoseconds) / NS_PER_SECOND)
        return PyLong_FromLongLong(seconds * NS_PER_SECOND + nanoseconds);

    PyObject *whole = PyLong_FromLongLong(seconds);
    PyObject *scale = PyLong_FromLongLong(NS_PER_SECOND);
    PyObject *fraction = PyLong_FromLongLong(nanoseconds);
    PyObject *scaled = whole && scale ? PyNumber_Multiply(whole, scale) : NULL;
    PyObject *result = scaled && fraction ? PyNumber_Add(scaled, fraction) : NULL;
    Py_XDECREF(whole);
    Py_XDECREF(scale);
    Py_XDECREF(fraction);
    Py_XDECREF(scaled);
    return result;
}

/*
 * decode(raw, inode_size) -> (mode, uid, gid, size, links, atime_ns, mtime_ns, ctime_ns,
 *     crtime_ns, flags, extra_isize, has_inode_xattrs, xattr_block) or None
 *
 * None when i_extra_isize does not fit the inode or is not a multiple of 4. An _extra time
 * field counts only where i_extra_isize covers it. Without i_crtime the creation time is
 * the mtime.
 */
static PyObject *
decode(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *raw;
    (void)module;

    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "decode() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t inode_size = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred() || inode_argument(args[0], inode_size, &raw) < 0)
        return NULL;

    Py_ssize_t length = inode_size;
    uint32_t extra_isize = 0;
    if (inode_size > GOOD_OLD_INODE_SIZE)
        extra_isize = field(raw, length, I_EXTRA_ISIZE, 2);
    if (extra_isize > (uint32_t)(inode_size - GOOD_OLD_INODE_SIZE) || extra_isize % 4)
        Py_RETURN_NONE;

    uint32_t mode = field(raw, length, I_MODE, 2);
    uint32_t uid = field(raw, length, I_UID, 2) | field(raw, length, I_UID_HIGH, 2) << 16;
    uint32_t gid = field(raw, length, I_GID, 2) | field(raw, length, I_GID_HIGH, 2) << 16;
    uint64_t size = field(raw, length, I_SIZE_LO, 4)
                    | (uint64_t)field(raw, length, I_SIZE_HIGH, 4) << 32;
    uint32_t links = field(raw, length, I_LINKS_COUNT, 2);
    uint32_t flags = field(raw, length, I_FLAGS, 4);
    uint64_t xattr_block = field(raw, length, I_FILE_ACL_LO, 4)
                           | (uint64_t)field(raw, length, I_FILE_ACL_HIGH, 2) << 32;

    /* In-inode xattrs start with their magic right after the extra fields. */
    Py_ssize_t xattr_start = GOOD_OLD_INODE_SIZE + extra_isize;
    int has_inode_xattrs = inode_size > GOOD_OLD_INODE_SIZE && xattr_start + 4 <= inode_size
                           && field(raw, length, xattr_start, 4) == XATTR_MAGIC;

    PyObject *mtime = decode_time(field(raw, length, I_MTIME, 4),
                                  extra_isize >= 12 ? field(raw, length, I_MTIME_EXTRA, 4) : 0);
    PyObject *atime = decode_time(field(raw, length, I_ATIME, 4),
                                  extra_isize >= 16 ? field(raw, length, I_ATIME_EXTRA, 4) : 0);
    PyObject *ctime = decode_time(field(raw, length, I_CTIME, 4),
                                  extra_isize >= 8 ? field(raw, length, I_CTIME_EXTRA, 4) : 0);
    PyObject *crtime;
    if (extra_isize >= 20) {
        crtime = decode_time(field(raw, length, I_CRTIME, 4),
                             extra_isize >= 24 ? field(raw, length, I_CRTIME_EXTRA, 4) : 0);
    } else {
        crtime = mtime;
        Py_XINCREF(crtime);
    }
    PyObject *result = NULL;
    if (mtime && atime && ctime && crtime) {
        result = Py_BuildValue("(kkkKkOOOOkkOK)", (unsigned long)mode, (unsigned long)uid,
                               (unsigned long)gid, (unsigned long long)size,
                               (unsigned long)links, atime, mtime, ctime, crtime,
                               (unsigned long)flags, (unsigned long)extra_isize,
                               has_inode_xattrs ? Py_True : Py_False,
                               (unsigned long long)xattr_block);
    }
    Py_XDECREF(mtime);
    Py_XDECREF(atime);
    Py_XDECREF(ctime);
    Py_XDECREF(crtime);
    return result;
}

/*
 * extent_node(node) -> (depth, max_entries, items) or None
 *
 * A node of an extent tree: i_block or a tree block. For a leaf (depth 0) the items are
 * (ee_block, physical block, length in blocks, initialized). In an index node they are the
 * child blocks. None when eh_magic is wrong or eh_entries and eh_max do not fit the node.
 */
static PyObject *
extent_node(PyObject *module, PyObject *node)
{
    (void)module;
    if (!PyBytes_Check(node)) {
        PyErr_Format(PyExc_TypeError, "invalid extent node: expected bytes, got %.100s",
                     Py_TYPE(node)->tp_name);
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(node);
    Py_ssize_t length = PyBytes_GET_SIZE(node);
    if (length < EXTENT_ENTRY_SIZE)
        Py_RETURN_NONE;

    uint32_t magic = field(data, length, 0, 2);
    uint32_t entries = field(data, length, 2, 2);
    uint32_t max_entries = field(data, length, 4, 2);
    uint32_t depth = field(data, length, 6, 2);
    Py_ssize_t capacity = (length - EXTENT_ENTRY_SIZE) / EXTENT_ENTRY_SIZE;
    if (magic != EXTENT_MAGIC || entries > max_entries || (Py_ssize_t)max_entries > capacity)
        Py_RETURN_NONE;

    PyObject *items = PyList_New(entries);
    if (items == NULL)
        return NULL;
    for (uint32_t index = 0; index < entries; index++) {
        Py_ssize_t offset = EXTENT_ENTRY_SIZE * (Py_ssize_t)(index + 1);
        PyObject *item;
        if (depth == 0) {
            struct extent extent = read_extent(data, length, index);
            item = Py_BuildValue("(KKKO)", (unsigned long long)extent.logical,
                                 (unsigned long long)extent.physical,
                                 (unsigned long long)extent.blocks,
                                 extent.initialized ? Py_True : Py_False);
        } else {
            uint64_t child = field(data, length, offset + 4, 4)
                             | (uint64_t)field(data, length, offset + 8, 2) << 32;
            item = PyLong_FromUnsignedLongLong(child);
        }
        if (item == NULL) {
            Py_DECREF(items);
            return NULL;
        }
        PyList_SET_ITEM(items, index, item);
    }
    return Py_BuildValue("(kkN)", (unsigned long)depth, (unsigned long)max_entries, items);
}

/*
 * inode_runs(raw, block_size, blocks_count) -> [(offset, device offset, length), ...] or None
 *
 * Return where a file's data lies, in bytes, for the common case only. That is an
 * extent-mapped inode whose tree is a valid leaf in i_block, with extents in order and
 * inside the filesystem. Runs skip unwritten extents and end at i_size. Anything else
 * (inline data, block maps, deeper trees, any invalid value) gives None, and the reader's
 * general path then reads it or rejects it with its own error message.
 */
static PyObject *
inode_runs(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;

    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "inode_runs() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "invalid raw inode: expected bytes");
        return NULL;
    }
    unsigned long long block_size = PyLong_AsUnsignedLongLong(args[1]);
    unsigned long long blocks_count = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t length = PyBytes_GET_SIZE(args[0]);
    if (length < GOOD_OLD_INODE_SIZE)
        Py_RETURN_NONE;

    uint32_t flags = field(raw, length, I_FLAGS, 4);
    if (!(flags & EXTENTS_FL) || (flags & INLINE_DATA_FL))
        Py_RETURN_NONE;
    uint64_t size = field(raw, length, I_SIZE_LO, 4)
                    | (uint64_t)field(raw, length, I_SIZE_HIGH, 4) << 32;

    const unsigned char *node = raw + I_BLOCK;
    uint32_t entries = field(node, I_BLOCK_SIZE, 2, 2);
    uint32_t max_entries = field(node, I_BLOCK_SIZE, 4, 2);
    if (field(node, I_BLOCK_SIZE, 0, 2) != EXTENT_MAGIC || field(node, I_BLOCK_SIZE, 6, 2) != 0
        || entries > max_entries || max_entries > I_BLOCK_EXTENT_SLOTS)
        Py_RETURN_NONE;

    /* Check every extent first, as the general path does, then build the runs. */
    struct extent extents[I_BLOCK_EXTENT_SLOTS];
    uint64_t previous_end = 0;
    for (uint32_t index = 0; index < entries; index++) {
        struct extent extent = read_extent(node, I_BLOCK_SIZE, index);
        if (extent.logical < previous_end || extent.physical == 0
            || extent.physical + extent.blocks > blocks_count)
            Py_RETURN_NONE;
        previous_end = extent.logical + extent.blocks;
        extents[index] = extent;
    }

    PyObject *runs = PyList_New(0);
    if (runs == NULL)
        return NULL;
    for (uint32_t index = 0; index < entries; index++) {
        const struct extent *extent = &extents[index];
        if (!extent->initialized)
            continue; /* unwritten, so it reads as zeros */
        uint64_t start = extent->logical * block_size;
        if (start >= size)
            break;
        uint64_t run_length = extent->blocks * block_size;
        if (run_length > size - start)
            run_length = size - start;
        PyObject *run = Py_BuildValue("(KKK)", (unsigned long long)start,
                                      (unsigned long long)(extent->physical * block_size),
                                      (unsigned long long)run_length);
        if (run == NULL || PyList_Append(runs, run) < 0) {
            Py_XDECREF(run);
            Py_DECREF(runs);
            return NULL;
        }
        Py_DECREF(run);
    }
    return runs;
}

/*
 * dir_entries(data, offset, end, block_size) -> [(name, inode, file_type), ...]
 *
 * Return the entries (ext4_dir_entry_2) of data[offset:end], without "." and ".." and
 * without the unused ones (inode 0). A rec_len that cannot contain its name, is not a multiple of 4 or
 * runs past ``end`` raises ValueError, and so does a name that is empty or contains "/" or
 * NUL. The error's text completes the reader's message "directory inode N has ...".
 */
static PyObject *
dir_entries(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;

    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "dir_entries() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "invalid directory data: expected bytes");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    Py_ssize_t end = PyLong_AsSsize_t(args[2]);
    Py_ssize_t block_size = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return NULL;
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    if (offset < 0 || end > PyBytes_GET_SIZE(args[0])) {
        PyErr_SetString(PyExc_IndexError, "invalid directory range: outside the data");
        return NULL;
    }

    PyObject *entries = PyList_New(0);
    if (entries == NULL)
        return NULL;
    while (offset + DIR_ENTRY_HEADER_SIZE <= end) {
        uint32_t inode = field(data, end, offset, 4);
        Py_ssize_t rec_len = field(data, end, offset + 4, 2);
        Py_ssize_t name_len = data[offset + 6];
        unsigned int file_type = data[offset + 7];
        /* 64 KiB blocks store a whole-block rec_len as 0 or 65535. */
        if ((rec_len == 0 || rec_len == 65535) && block_size == 65536)
            rec_len = 65536;
        if (rec_len < DIR_ENTRY_HEADER_SIZE + name_len || rec_len % 4 || offset + rec_len > end) {
            PyErr_Format(PyExc_ValueError, "an entry at byte %zd with rec_len %zd", offset,
                         rec_len);
            goto error;
        }

        const char *name = (const char *)data + offset + DIR_ENTRY_HEADER_SIZE;
        int is_dot = (name_len == 1 && name[0] == '.')
                     || (name_len == 2 && name[0] == '.' && name[1] == '.');
        if (inode && !is_dot) {
            if (name_len == 0 || memchr(name, '/', (size_t)name_len)
                || memchr(name, '\0', (size_t)name_len)) {
                PyObject *invalid_name = PyBytes_FromStringAndSize(name, name_len);
                if (invalid_name != NULL) {
                    PyErr_Format(PyExc_ValueError, "the invalid name %R", invalid_name);
                    Py_DECREF(invalid_name);
                }
                goto error;
            }
            PyObject *entry = Py_BuildValue("(y#kI)", name, name_len, (unsigned long)inode,
                                            file_type);
            if (entry == NULL || PyList_Append(entries, entry) < 0) {
                Py_XDECREF(entry);
                goto error;
            }
            Py_DECREF(entry);
        }
        offset += rec_len;
    }
    return entries;

error:
    Py_DECREF(entries);
    return NULL;
}

/* Store ``value`` little-endian in ``size`` bytes at ``out``. */
static void
put(unsigned char *out, uint64_t value, int size)
{
    for (int index = 0; index < size; index++)
        out[index] = (unsigned char)(value >> (8 * index));
}

enum {
    PACK_TABLE,
    PACK_OFFSET,
    PACK_NUMBER,
    PACK_SEED,
    PACK_MODE,
    PACK_UID,
    PACK_GID,
    PACK_SIZE,
    PACK_LINKS,
    PACK_SECTORS,
    PACK_FLAGS,
    PACK_I_BLOCK,
    PACK_XATTR_BLOCK,
    PACK_MTIME,
    PACK_MTIME_EXTRA,
    PACK_ATIME,
    PACK_ATIME_EXTRA,
    PACK_CTIME,
    PACK_CTIME_EXTRA,
    PACK_CRTIME,
    PACK_CRTIME_EXTRA,
    PACK_INLINE_XATTRS,
    PACK_COUNT
};

/*
 * pack_inode(table, offset, number, seed, mode, uid, gid, size, links, sectors, flags,
 *     i_block, xattr_block, mtime, mtime_extra, atime, atime_extra, ctime, ctime_extra,
 *     crtime, crtime_extra, inline_xattrs)
 *
 * Write a 256-byte inode with 32 bytes of extra fields into the zeroed slot at ``offset`` of
 * the bytearray ``table``. It contains i_block (at most 60 bytes) and the in-inode xattr area
 * when one is given. The checksum is ext4_inode_csum() from the filesystem's ``seed`` with
 * i_generation 0. Fields that lcow never sets stay zero.
 */
static PyObject *
pack_inode(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long long values[PACK_COUNT];
    (void)module;

    if (nargs != PACK_COUNT) {
        PyErr_Format(PyExc_TypeError, "pack_inode() takes %d arguments (%zd given)", PACK_COUNT,
                     nargs);
        return NULL;
    }
    if (!PyByteArray_Check(args[PACK_TABLE]) || !PyBytes_Check(args[PACK_I_BLOCK])
        || (args[PACK_INLINE_XATTRS] != Py_None && !PyBytes_Check(args[PACK_INLINE_XATTRS]))) {
        PyErr_SetString(PyExc_TypeError,
                        "invalid pack_inode() arguments: expected a bytearray table, bytes "
                        "i_block and bytes or None for the xattr area");
        return NULL;
    }
    for (int index = PACK_OFFSET; index < PACK_COUNT; index++) {
        if (index == PACK_I_BLOCK || index == PACK_INLINE_XATTRS)
            continue;
        values[index] = PyLong_AsUnsignedLongLong(args[index]);
        if (values[index] == (unsigned long long)-1 && PyErr_Occurred())
            return NULL;
    }

    Py_ssize_t i_block_length = PyBytes_GET_SIZE(args[PACK_I_BLOCK]);
    Py_ssize_t xattrs_length = 0;
    if (args[PACK_INLINE_XATTRS] != Py_None)
        xattrs_length = PyBytes_GET_SIZE(args[PACK_INLINE_XATTRS]);
    Py_ssize_t offset = (Py_ssize_t)values[PACK_OFFSET];
    if (i_block_length > I_BLOCK_SIZE || xattrs_length > PACKED_INODE_SIZE - PACKED_XATTR_OFFSET
        || offset < 0 || offset > PyByteArray_GET_SIZE(args[PACK_TABLE]) - PACKED_INODE_SIZE) {
        PyErr_SetString(PyExc_ValueError,
                        "invalid pack_inode() arguments: the inode does not fit its slot");
        return NULL;
    }

    /* The checksum covers the inode number and i_generation, then the inode, so the inode is
     * built after those 8 bytes and copied into the table once its checksum is in. */
    PyObject *covered = PyBytes_FromStringAndSize(NULL, 8 + PACKED_INODE_SIZE);
    if (covered == NULL)
        return NULL;
    unsigned char *data = (unsigned char *)PyBytes_AS_STRING(covered);
    memset(data, 0, 8 + PACKED_INODE_SIZE);
    put(data, values[PACK_NUMBER], 4);
    unsigned char *inode = data + 8;

    uint64_t size = values[PACK_SIZE], sectors = values[PACK_SECTORS];
    uint64_t uid = values[PACK_UID], gid = values[PACK_GID];
    uint64_t xattr_block = values[PACK_XATTR_BLOCK];
    put(inode + I_MODE, values[PACK_MODE], 2);
    put(inode + I_UID, uid & 0xFFFF, 2);
    put(inode + I_SIZE_LO, size & 0xFFFFFFFF, 4);
    put(inode + I_ATIME, values[PACK_ATIME], 4);
    put(inode + I_CTIME, values[PACK_CTIME], 4);
    put(inode + I_MTIME, values[PACK_MTIME], 4);
    put(inode + I_GID, gid & 0xFFFF, 2);
    put(inode + I_LINKS_COUNT, values[PACK_LINKS], 2);
    put(inode + I_BLOCKS_LO, sectors & 0xFFFFFFFF, 4);
    put(inode + I_FLAGS, values[PACK_FLAGS], 4);
    memcpy(inode + I_BLOCK, PyBytes_AS_STRING(args[PACK_I_BLOCK]), (size_t)i_block_length);
    put(inode + I_FILE_ACL_LO, xattr_block & 0xFFFFFFFF, 4);
    put(inode + I_SIZE_HIGH, size >> 32, 4);
    put(inode + I_BLOCKS_HIGH, sectors >> 32, 2);
    put(inode + I_FILE_ACL_HIGH, xattr_block >> 32, 2);
    put(inode + I_UID_HIGH, uid >> 16, 2);
    put(inode + I_GID_HIGH, gid >> 16, 2);
    put(inode + I_EXTRA_ISIZE, PACKED_EXTRA_ISIZE, 2);
    put(inode + I_CTIME_EXTRA, values[PACK_CTIME_EXTRA], 4);
    put(inode + I_MTIME_EXTRA, values[PACK_MTIME_EXTRA], 4);
    put(inode + I_ATIME_EXTRA, values[PACK_ATIME_EXTRA], 4);
    put(inode + I_CRTIME, values[PACK_CRTIME], 4);
    put(inode + I_CRTIME_EXTRA, values[PACK_CRTIME_EXTRA], 4);
    if (xattrs_length)
        memcpy(inode + PACKED_XATTR_OFFSET, PyBytes_AS_STRING(args[PACK_INLINE_XATTRS]),
               (size_t)xattrs_length);

    /* ``inode`` points into ``covered``, which is released only after the last use. */
    uint64_t checksum;
    if (raw_crc32c(covered, values[PACK_SEED], &checksum) < 0) {
        Py_DECREF(covered);
        return NULL;
    }
    put(inode + I_CHECKSUM_LO, checksum & 0xFFFF, 2);
    put(inode + I_CHECKSUM_HI, checksum >> 16, 2);
    memcpy(PyByteArray_AS_STRING(args[PACK_TABLE]) + offset, inode, PACKED_INODE_SIZE);
    Py_DECREF(covered);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"checksums", (PyCFunction)(void (*)(void))checksums, METH_FASTCALL,
     "checksums(raw, number, seed, inode_size) -> (stored, computed)\n--\n\n"
     "Return an inode's stored checksum and the one its bytes give."},
    {"decode", (PyCFunction)(void (*)(void))decode, METH_FASTCALL,
     "decode(raw, inode_size) -> tuple | None\n--\n\n"
     "Decode an inode's fields; None when i_extra_isize is invalid."},
    {"inode_runs", (PyCFunction)(void (*)(void))inode_runs, METH_FASTCALL,
     "inode_runs(raw, block_size, blocks_count) -> list | None\n--\n\n"
     "Return a file's data runs when its extent tree is a valid leaf in the inode."},
    {"pack_inode", (PyCFunction)(void (*)(void))pack_inode, METH_FASTCALL,
     "pack_inode(table, offset, number, seed, mode, uid, gid, size, links, sectors, flags, "
     "i_block, xattr_block, mtime, mtime_extra, atime, atime_extra, ctime, ctime_extra, crtime, "
     "crtime_extra, inline_xattrs)\n--\n\n"
     "Write an inode and its checksum into a zeroed slot of an inode table."},
    {"dir_entries", (PyCFunction)(void (*)(void))dir_entries, METH_FASTCALL,
     "dir_entries(data, offset, end, block_size) -> list\n--\n\n"
     "Parse the directory entries of data[offset:end]. A bad one raises ValueError."},
    {"extent_node", extent_node, METH_O,
     "extent_node(node) -> (depth, max_entries, items) | None\n--\n\n"
     "Parse a node of an extent tree; None when its header is invalid."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "lcow.ext4._inode",
    .m_doc = "The per-inode work of the ext4 reader and writer, written in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__inode(void)
{
    PyObject *crc = PyImport_ImportModule("lcow.crc");
    if (crc == NULL)
        return NULL;
    standard_crc32c = PyObject_GetAttrString(crc, "crc32c");
    Py_DECREF(crc);
    if (standard_crc32c == NULL)
        return NULL;
    return PyModule_Create(&module_definition);
}
