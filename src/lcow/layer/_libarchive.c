/*
 * The libarchive calls that run for every tar header and every data block, written in C.
 *
 * Through ctypes, one libarchive call took about 300 ns, and decoding an entry took a dozen
 * calls. Here read_header() reads a header and returns all of the entry's fields, and
 * read_block() returns a data block as a memoryview.
 *
 * bind() takes the functions' addresses from the libarchive that lcow.layer.tarstream opened
 * with ctypes. So the build needs no libarchive headers, and lcow calls one library, the one
 * that $LIBARCHIVE names. The prototypes follow libarchive 3's archive.h and archive_entry.h.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>

#define ARCHIVE_OK 0
#define ARCHIVE_WARN (-20)

struct archive;
struct archive_entry;

#if defined(__has_include)
#if __has_include(<archive.h>) && __has_include(<archive_entry.h>)
#include <archive.h>
#include <archive_entry.h>
#define CHECK_PROTOTYPES 1
#endif
#endif

static int (*read_next_header)(struct archive *, struct archive_entry **);
static int (*read_data_block)(struct archive *, const void **, size_t *, int64_t *);
static int64_t (*read_header_position)(struct archive *);
static const char *(*entry_pathname)(struct archive_entry *);
static const char *(*entry_hardlink)(struct archive_entry *);
static const char *(*entry_symlink)(struct archive_entry *);
static mode_t (*entry_mode)(struct archive_entry *);
static int64_t (*entry_uid)(struct archive_entry *);
static int64_t (*entry_gid)(struct archive_entry *);
static int64_t (*entry_size)(struct archive_entry *);
static int (*entry_size_is_set)(struct archive_entry *);
static dev_t (*entry_rdevmajor)(struct archive_entry *);
static dev_t (*entry_rdevminor)(struct archive_entry *);
static time_t (*entry_mtime)(struct archive_entry *);
static long (*entry_mtime_nsec)(struct archive_entry *);
static time_t (*entry_atime)(struct archive_entry *);
static long (*entry_atime_nsec)(struct archive_entry *);
static int (*entry_atime_is_set)(struct archive_entry *);
static time_t (*entry_ctime)(struct archive_entry *);
static long (*entry_ctime_nsec)(struct archive_entry *);
static int (*entry_ctime_is_set)(struct archive_entry *);
static time_t (*entry_birthtime)(struct archive_entry *);
static long (*entry_birthtime_nsec)(struct archive_entry *);
static int (*entry_birthtime_is_set)(struct archive_entry *);
static int (*entry_xattr_reset)(struct archive_entry *);
static int (*entry_xattr_next)(struct archive_entry *, const char **, const void **, size_t *);

/* The functions by their names in libarchive, with the pointer that bind() sets. */
static const struct {
    const char *name;
    void *slot;
} functions[] = {
    {"archive_read_next_header", (void *)&read_next_header},
    {"archive_read_data_block", (void *)&read_data_block},
    {"archive_read_header_position", (void *)&read_header_position},
    {"archive_entry_pathname", (void *)&entry_pathname},
    {"archive_entry_hardlink", (void *)&entry_hardlink},
    {"archive_entry_symlink", (void *)&entry_symlink},
    {"archive_entry_mode", (void *)&entry_mode},
    {"archive_entry_uid", (void *)&entry_uid},
    {"archive_entry_gid", (void *)&entry_gid},
    {"archive_entry_size", (void *)&entry_size},
    {"archive_entry_size_is_set", (void *)&entry_size_is_set},
    {"archive_entry_rdevmajor", (void *)&entry_rdevmajor},
    {"archive_entry_rdevminor", (void *)&entry_rdevminor},
    {"archive_entry_mtime", (void *)&entry_mtime},
    {"archive_entry_mtime_nsec", (void *)&entry_mtime_nsec},
    {"archive_entry_atime", (void *)&entry_atime},
    {"archive_entry_atime_nsec", (void *)&entry_atime_nsec},
    {"archive_entry_atime_is_set", (void *)&entry_atime_is_set},
    {"archive_entry_ctime", (void *)&entry_ctime},
    {"archive_entry_ctime_nsec", (void *)&entry_ctime_nsec},
    {"archive_entry_ctime_is_set", (void *)&entry_ctime_is_set},
    {"archive_entry_birthtime", (void *)&entry_birthtime},
    {"archive_entry_birthtime_nsec", (void *)&entry_birthtime_nsec},
    {"archive_entry_birthtime_is_set", (void *)&entry_birthtime_is_set},
    {"archive_entry_xattr_reset", (void *)&entry_xattr_reset},
    {"archive_entry_xattr_next", (void *)&entry_xattr_next},
};

#define FUNCTION_COUNT (sizeof(functions) / sizeof(functions[0]))

#ifdef CHECK_PROTOTYPES
/* Prototype checks, compiled only where libarchive's headers are installed. */
#define SAME_TYPE(pointer, function)                                                            \
    _Static_assert(__builtin_types_compatible_p(__typeof__(pointer), __typeof__(&function)),      \
                   #pointer " does not match " #function)
SAME_TYPE(read_next_header, archive_read_next_header);
SAME_TYPE(read_data_block, archive_read_data_block);
SAME_TYPE(read_header_position, archive_read_header_position);
SAME_TYPE(entry_pathname, archive_entry_pathname);
SAME_TYPE(entry_hardlink, archive_entry_hardlink);
SAME_TYPE(entry_symlink, archive_entry_symlink);
SAME_TYPE(entry_mode, archive_entry_mode);
SAME_TYPE(entry_uid, archive_entry_uid);
SAME_TYPE(entry_gid, archive_entry_gid);
SAME_TYPE(entry_size, archive_entry_size);
SAME_TYPE(entry_size_is_set, archive_entry_size_is_set);
SAME_TYPE(entry_rdevmajor, archive_entry_rdevmajor);
SAME_TYPE(entry_rdevminor, archive_entry_rdevminor);
SAME_TYPE(entry_mtime, archive_entry_mtime);
SAME_TYPE(entry_mtime_nsec, archive_entry_mtime_nsec);
SAME_TYPE(entry_atime, archive_entry_atime);
SAME_TYPE(entry_atime_nsec, archive_entry_atime_nsec);
SAME_TYPE(entry_atime_is_set, archive_entry_atime_is_set);
SAME_TYPE(entry_ctime, archive_entry_ctime);
SAME_TYPE(entry_ctime_nsec, archive_entry_ctime_nsec);
SAME_TYPE(entry_ctime_is_set, archive_entry_ctime_is_set);
SAME_TYPE(entry_birthtime, archive_entry_birthtime);
SAME_TYPE(entry_birthtime_nsec, archive_entry_birthtime_nsec);
SAME_TYPE(entry_birthtime_is_set, archive_entry_birthtime_is_set);
SAME_TYPE(entry_xattr_reset, archive_entry_xattr_reset);
SAME_TYPE(entry_xattr_next, archive_entry_xattr_next);
#undef SAME_TYPE
#endif

static int bound = 0;

static PyObject *
bind(PyObject *module, PyObject *addresses)
{
    (void)module;
    if (!PyDict_Check(addresses)) {
        PyErr_SetString(PyExc_TypeError, "invalid argument of bind(): expected a dict of function names to addresses");
        return NULL;
    }
    void *found[FUNCTION_COUNT];
    for (size_t index = 0; index < FUNCTION_COUNT; index++) {
        PyObject *address = PyDict_GetItemString(addresses, functions[index].name);
        if (address == NULL) {
            PyErr_Format(PyExc_KeyError, "missing the address of %s in the argument of bind()",
                         functions[index].name);
            return NULL;
        }
        if (address == Py_None) {
            PyErr_Format(PyExc_ValueError, "invalid address of %s: None",
                         functions[index].name);
            return NULL;
        }
        found[index] = PyLong_AsVoidPtr(address);
        if (found[index] == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_Format(PyExc_ValueError, "invalid address of %s: NULL",
                             functions[index].name);
            }
            return NULL;
        }
    }
    /* A failed bind() changes no pointer. The slots hold function pointers of other types,
       so memcpy sets them: a store through void ** would break the aliasing rules. */
    for (size_t index = 0; index < FUNCTION_COUNT; index++) {
        memcpy(functions[index].slot, &found[index], sizeof(void *));
    }
    bound = 1;
    Py_RETURN_NONE;
}

static struct archive *
archive_argument(PyObject *argument)
{
    if (!bound) {
        PyErr_SetString(PyExc_RuntimeError, "lcow.layer._libarchive has no libarchive functions yet: call bind() first");
        return NULL;
    }
    struct archive *archive = PyLong_AsVoidPtr(argument);
    if (archive == NULL && !PyErr_Occurred()) {
        PyErr_SetString(PyExc_ValueError, "invalid archive pointer: NULL");
    }
    return archive;
}

/* Return a C string as bytes, or None for NULL. */
static PyObject *
bytes_or_none(const char *value)
{
    if (value == NULL) {
        Py_RETURN_NONE;
    }
    return PyBytes_FromString(value);
}

/* Return the seconds of a time, or None when the header gave no such time. */
static PyObject *
seconds_or_none(int is_set, time_t seconds)
{
    if (!is_set) {
        Py_RETURN_NONE;
    }
    return PyLong_FromLongLong((long long)seconds);
}

/* Return the entry's extended attributes as a list of (name, value), or None for none. */
static PyObject *
xattrs(struct archive_entry *entry)
{
    if (entry_xattr_reset(entry) == 0) {
        Py_RETURN_NONE;
    }
    PyObject *list = PyList_New(0);
    if (list == NULL) {
        return NULL;
    }
    const char *name;
    const void *value;
    size_t length;
    while (entry_xattr_next(entry, &name, &value, &length) == ARCHIVE_OK) {
        PyObject *pair = Py_BuildValue("(yy#)", name != NULL ? name : "",
                                       length ? (const char *)value : "", (Py_ssize_t)length);
        if (pair == NULL || PyList_Append(list, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(pair);
    }
    return list;
}

enum {
    HEADER_STATUS,
    HEADER_PATH,
    HEADER_HARDLINK,
    HEADER_SYMLINK,
    HEADER_MODE,
    HEADER_UID,
    HEADER_GID,
    HEADER_SIZE,
    HEADER_RDEV_MAJOR,
    HEADER_RDEV_MINOR,
    HEADER_MTIME_S,
    HEADER_MTIME_NS,
    HEADER_ATIME_S,
    HEADER_ATIME_NS,
    HEADER_CTIME_S,
    HEADER_CTIME_NS,
    HEADER_BIRTHTIME_S,
    HEADER_BIRTHTIME_NS,
    HEADER_POSITION,
    HEADER_XATTRS,
    HEADER_FIELDS,
};

static PyObject *
read_header(PyObject *module, PyObject *argument)
{
    (void)module;
    struct archive *archive = archive_argument(argument);
    if (archive == NULL) {
        return NULL;
    }
    struct archive_entry *entry = NULL;
    int status = read_next_header(archive, &entry);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (status != ARCHIVE_OK && status != ARCHIVE_WARN) {
        return Py_BuildValue("(i)", status);
    }

    PyObject *fields = PyTuple_New(HEADER_FIELDS);
    if (fields == NULL) {
        return NULL;
    }
    /* Each field is set as soon as it is created, and the first failure stops, so no C-API
       call runs with an exception set. PyTuple_New fills the tuple with NULL, which
       Py_DECREF of a partly filled tuple accepts. */
#define SET_FIELD(index, value)                                                                 \
    do {                                                                                        \
        PyObject *field = (value);                                                              \
        if (field == NULL) {                                                                    \
            Py_DECREF(fields);                                                                  \
            return NULL;                                                                        \
        }                                                                                       \
        PyTuple_SET_ITEM(fields, (index), field);                                               \
    } while (0)
    SET_FIELD(HEADER_STATUS, PyLong_FromLong(status));
    SET_FIELD(HEADER_PATH, bytes_or_none(entry_pathname(entry)));
    SET_FIELD(HEADER_HARDLINK, bytes_or_none(entry_hardlink(entry)));
    SET_FIELD(HEADER_SYMLINK, bytes_or_none(entry_symlink(entry)));
    SET_FIELD(HEADER_MODE, PyLong_FromUnsignedLong(entry_mode(entry)));
    SET_FIELD(HEADER_UID, PyLong_FromLongLong(entry_uid(entry)));
    SET_FIELD(HEADER_GID, PyLong_FromLongLong(entry_gid(entry)));
    SET_FIELD(HEADER_SIZE, PyLong_FromLongLong(entry_size_is_set(entry) ? entry_size(entry) : 0));
    SET_FIELD(HEADER_RDEV_MAJOR, PyLong_FromUnsignedLongLong(entry_rdevmajor(entry)));
    SET_FIELD(HEADER_RDEV_MINOR, PyLong_FromUnsignedLongLong(entry_rdevminor(entry)));
    SET_FIELD(HEADER_MTIME_S, PyLong_FromLongLong((long long)entry_mtime(entry)));
    SET_FIELD(HEADER_MTIME_NS, PyLong_FromLong(entry_mtime_nsec(entry)));
    SET_FIELD(HEADER_ATIME_S, seconds_or_none(entry_atime_is_set(entry), entry_atime(entry)));
    SET_FIELD(HEADER_ATIME_NS, PyLong_FromLong(entry_atime_nsec(entry)));
    SET_FIELD(HEADER_CTIME_S, seconds_or_none(entry_ctime_is_set(entry), entry_ctime(entry)));
    SET_FIELD(HEADER_CTIME_NS, PyLong_FromLong(entry_ctime_nsec(entry)));
    SET_FIELD(HEADER_BIRTHTIME_S,
              seconds_or_none(entry_birthtime_is_set(entry), entry_birthtime(entry)));
    SET_FIELD(HEADER_BIRTHTIME_NS, PyLong_FromLong(entry_birthtime_nsec(entry)));
    SET_FIELD(HEADER_POSITION, PyLong_FromLongLong(read_header_position(archive)));
    SET_FIELD(HEADER_XATTRS, xattrs(entry));
#undef SET_FIELD
    return fields;
}

static PyObject *
read_block(PyObject *module, PyObject *argument)
{
    (void)module;
    struct archive *archive = archive_argument(argument);
    if (archive == NULL) {
        return NULL;
    }
    const void *block = NULL;
    size_t size = 0;
    int64_t offset = 0;
    int status = read_data_block(archive, &block, &size, &offset);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if ((status != ARCHIVE_OK && status != ARCHIVE_WARN) || size == 0) {
        return Py_BuildValue("(iLO)", status, (long long)offset, Py_None);
    }
    /* The view owns nothing: the bytes stay valid until the next libarchive call. */
    PyObject *view = PyMemoryView_FromMemory((char *)block, (Py_ssize_t)size, PyBUF_READ);
    if (view == NULL) {
        return NULL;
    }
    return Py_BuildValue("(iLN)", status, (long long)offset, view);
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_O, "Take the addresses of the libarchive functions, by name."},
    {"read_header", read_header, METH_O,
     "Read the next header: (status,) at the end or on an error, else all the fields."},
    {"read_block", read_block, METH_O,
     "Read the next data block of the entry: (status, offset, memoryview or None)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "lcow.layer._libarchive",
    .m_doc = "The libarchive calls for every tar header and data block, written in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__libarchive(void)
{
    PyObject *module = PyModule_Create(&module_definition);
    if (module == NULL) {
        return NULL;
    }
    PyObject *names = PyTuple_New(FUNCTION_COUNT);
    if (names == NULL) {
        Py_DECREF(module);
        return NULL;
    }
    for (size_t index = 0; index < FUNCTION_COUNT; index++) {
        PyObject *name = PyUnicode_FromString(functions[index].name);
        if (name == NULL) {
            Py_DECREF(names);
            Py_DECREF(module);
            return NULL;
        }
        PyTuple_SET_ITEM(names, (Py_ssize_t)index, name);
    }
    if (PyModule_AddObject(module, "FUNCTION_NAMES", names) < 0) {
        Py_DECREF(names);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
