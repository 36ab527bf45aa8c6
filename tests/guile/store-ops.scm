;;; store-ops.scm -- drive a guix-daemon with the upstream Guile client.
;;;
;;; This is guixsvc's own test code.  It uses the upstream (guix store),
;;; (guix derivations) and (guix serialization) modules, which are NOT part
;;; of this repository: put an upstream Guix source tree (with a generated
;;; guix/config.scm) on the Guile load path, e.g. with the out-of-tree
;;; wrapper /work/guile-client/run.sh:
;;;
;;;   NIX_STORE_DIR=/tmp/gs/store GUIX_DAEMON_SOCKET=/tmp/gs/socket \
;;;     /work/guile-client/run.sh tests/guile/store-ops.scm
;;;
;;; NIX_STORE_DIR must be the daemon's store directory (it must exist).
;;; For every check it prints "ok NAME", "skip NAME: WHY" or
;;; "FAIL NAME: DETAILS"; it exits 1 if anything failed, 0 otherwise.
;;; Expected values are computed on the client side (store-path,
;;; fixed-output-path, nar serialization of the source files, (gcrypt hash)).

(use-modules (guix store)
             (guix derivations)
             (guix serialization)
             (guix base16)
             (guix config)
             (gcrypt hash)
             (gcrypt pk-crypto)
             (guix pki)
             (rnrs bytevectors)
             (ice-9 binary-ports)
             (ice-9 textual-ports)
             (ice-9 match)
             (ice-9 format)
             ((ice-9 exceptions) #:select (exception-with-irritants?
                                           exception-irritants))
             (srfi srfi-1)
             (srfi srfi-11)
             (srfi srfi-26)
             (srfi srfi-34)
             (srfi srfi-35))

;;;
;;; Reporting.
;;;

(define failures 0)
(define passes 0)

(define (describe-condition c)
  (cond ((store-protocol-error? c)
         (format #f "store-protocol-error (status ~a): ~a"
                 (store-protocol-error-status c)
                 (store-protocol-error-message c)))
        ((store-connection-error? c)
         (format #f "store-connection-error: ~a: ~a"
                 (store-connection-error-file c)
                 (false-if-exception
                  (strerror (store-connection-error-code c)))))
        ((nar-error? c)
         (if (nar-error-file c)
             (format #f "nar-error (file ~s)" (nar-error-file c))
             "nar-error: premature end of input (daemon closed the connection?)"))
        ((message-condition? c)
         (if (exception-with-irritants? c)
             (format #f "~a ~s" (condition-message c) (exception-irritants c))
             (condition-message c)))
        (else (format #f "~s" c))))

(define (fail! name details)
  (set! failures (+ failures 1))
  (format #t "FAIL ~a: ~a~%" name details)
  (force-output))

(define (pass! name)
  (set! passes (+ passes 1))
  (format #t "ok ~a~%" name)
  (force-output))

(define (skip! name why)
  (format #t "skip ~a: ~a~%" name why)
  (force-output))

;; Set once the connection is open; reopened after errors that may have
;; killed the session (anything but &store-protocol-error).
(define store #f)

(define (after-error! c)
  (unless (store-protocol-error? c)
    (when store
      (false-if-exception (close-connection store))
      (set! store (false-if-exception (open-connection)))
      (format #t "# reconnected after error: ~a~%"
              (if store "ok" "failed")))))

;; BODY evaluates to #t (pass), or a string/other value (failure details).
(define-syntax-rule (check name body ...)
  (let ((result (guard (c (#t (after-error! c)
                              (string-append "exception: "
                                             (describe-condition c))))
                  (let () body ...))))
    (if (eq? result #t)
        (pass! name)
        (fail! name (if (string? result) result (format #f "~s" result))))
    (eq? result #t)))

;; Evaluate BODY; if it raises, report the failure and return #f.
(define-syntax-rule (try name body ...)
  (guard (c (#t (fail! name (string-append "exception: "
                                           (describe-condition c)))
                (after-error! c)
                #f))
    (let () body ...)))

;; Checks return #t or a description of the first mismatch.
(define (same what actual expected)
  (if (equal? actual expected)
      #t
      (format #f "~a: got ~s, expected ~s" what actual expected)))

(define (all . results)
  (or (find (negate (cut eq? <> #t)) results) #t))

(define (sorted lst) (sort lst string<?))

(define (raises-protocol-error? thunk)
  "Return #t if THUNK raises &store-protocol-error, else a failure string."
  (guard (c ((store-protocol-error? c) #t)
            (#t (string-append "wrong exception: " (describe-condition c))))
    (let ((v (thunk)))
      (format #f "no error raised, returned ~s" v))))

;;;
;;; Client-side expectations.
;;;

(define (nar-bytevector file)
  "Return the nar serialization of FILE."
  (call-with-values open-bytevector-output-port
    (lambda (port get)
      (write-file file port)
      (get))))

(define (text-path name text refs)
  "The store path of add-text-to-store NAME TEXT REFS (Nix makeTextPath)."
  (store-path (string-join (cons "text" (sorted refs)) ":")
              (sha256 (string->utf8 text))
              name))

(define (write-text-file file text)
  (call-with-output-file file
    (lambda (port) (set-port-encoding! port "UTF-8") (display text port))))

(define* (path-info-checks what store path
                          #:key nar (references '()) (deriver #f) start)
  "Compare the daemon's path-info for PATH with the expectations."
  (let ((info (query-path-info store path))
        (now  (current-time)))
    (all (same (string-append what " deriver") (path-info-deriver info) deriver)
         (same (string-append what " hash") 
               (bytevector->base16-string (path-info-hash info))
               (bytevector->base16-string (sha256 nar)))
         (same (string-append what " nar-size") (path-info-nar-size info)
               (bytevector-length nar))
         (same (string-append what " references")
               (sorted (path-info-references info)) (sorted references))
         (let ((t (path-info-registration-time info)))
           (if (and (integer? t) (>= t (- start 5)) (<= t (+ now 5)))
               #t
               (format #f "~a registration-time ~s not within [~a, ~a]"
                       what t (- start 5) (+ now 5)))))))

(define (on-disk-nar-check what path nar)
  "Check the store item PATH, read directly from disk, serializes to NAR."
  (same (string-append what " on-disk nar") 
        (bytevector->base16-string (sha256 (nar-bytevector path)))
        (bytevector->base16-string (sha256 nar))))

;;;
;;; Export format parsing (nix export format, as written by 'export-paths').
;;;

(define %export-magic #x4558494e)

(define (parse-export bv)
  "Parse the output of 'export-paths'.  Return a list of entries
(PATH NAR REFERENCES DERIVER SIGNATURE-OR-#f HASHED-BYTES)."
  (define port (open-bytevector-input-port bv))
  (let loop ((entries '()))
    (match (read-int port)
      (0 (unless (eof-object? (lookahead-u8 port))
           (error "trailing data after export"))
         (reverse entries))
      (1
       (let* ((start (ftell port))
              ;; Read the nar by parsing it with 'fold-archive'-free means:
              ;; we know its serialization is a sequence of strings.
              (nar   (read-nar-bytes port))
              (magic (read-int port))
              (path  (read-string port))
              (refs  (read-string-list port))
              (drv   (read-string port))
              (end   (ftell port))
              (sig?  (read-int port))
              (sig   (and (= sig? 1) (read-string port))))
         (unless (= magic %export-magic)
           (error "bad export magic" magic))
         (loop (cons (list path nar refs drv sig
                           (let ((b (make-bytevector (- end start))))
                             (bytevector-copy! bv start b 0 (- end start))
                             b))
                     entries))))
      (x (error "bad export entry marker" x)))))

(define (read-nar-bytes port)
  "Read one nar from PORT and return its bytes.  A nar is a sequence of
length-prefixed, padded strings; track parenthesis nesting to find its end."
  (define start (ftell port))
  (define (read-token) (read-latin1-string port))
  (unless (string=? (read-token) "nix-archive-1")
    (error "not a nar"))
  (let loop ((depth 0) (first? #t))
    (let ((tok (read-token)))
      (cond ((string=? tok "(") (loop (+ depth 1) #f))
            ((string=? tok ")")
             (if (= depth 1)
                 #t
                 (loop (- depth 1) #f)))
            ((member tok '("contents" "target" "name" "type" "entry" "node"
                           "executable" "regular" "directory" "symlink" ""))
             (when (string=? tok "contents")
               ;; Skip the contents string without decoding it.
               (let* ((len (read-long-long port))
                      (pad (modulo (- 8 (modulo len 8)) 8)))
                 (seek port (+ len pad) SEEK_CUR)))
             (when (member tok '("target" "name"))
               (read-token))
             (loop depth #f))
            (else (error "unexpected nar token" tok)))))
  (let* ((end (ftell port))
         (bv  (make-bytevector (- end start))))
    (seek port start SEEK_SET)
    (get-bytevector-n! port bv 0 (- end start))
    bv))

;;;
;;; The checks.
;;;

(define start-time (current-time))
(define start-clock (get-internal-real-time))
(define nonce
  (let ((state (random-state-from-platform)))
    (format #f "~a-~a-~36r" (getpid) start-time (random (expt 2 64) state))))
(define tmpdir (mkdtemp "/tmp/store-ops-XXXXXX"))
(define (tmp file) (string-append tmpdir "/" file))

(format #t "# store ~a, socket ~a, nonce ~a~%"
        (%store-prefix) (%daemon-socket-uri) nonce)

;; Report a dead connection as failed checks rather than dying of SIGPIPE.
(sigaction SIGPIPE SIG_IGN)

(set! store
  (guard (c (#t (fail! "open-connection" (describe-condition c))
                (exit 1)))
    (open-connection)))

(check "handshake protocol version"
  (let ((major (store-connection-major-version store))
        (minor (store-connection-minor-version store)))
    (format #t "# daemon protocol ~a.~a (client ~a)~%"
            major minor
            (number->string (@@ (guix store) %protocol-version) 16))
    (all (same "major" major #x100)
         (if (>= minor #x60) #t (format #f "minor ~a < #x60" minor)))))

(check "set-build-options"
  (set-build-options store
                     #:keep-failed? #f #:keep-going? #t #:fallback? #f
                     #:verbosity 0 #:max-build-jobs 1 #:max-silent-time 600
                     #:timeout 3600 #:build-cores 1
                     #:use-substitutes? #f #:offload? #f
                     #:print-build-trace #f)
  ;; The connection must still be in sync afterwards.
  (same "valid-path? after set-build-options"
        (valid-path? store (string-append (%store-prefix)
                                          "/00000000000000000000000000000000-x"))
        #f))

(check "built-in-builders"
  (let ((builders (built-in-builders store)))
    (format #t "# built-in builders: ~s~%" builders)
    (if (and (list? builders) (every string? builders)
             (member "download" builders))
        #t
        (format #f "unexpected builders ~s" builders))))

;; add-text-to-store without references.
(define text-a (string-append "hello from store-ops " nonce "\n"))
(define name-a "store-ops-a.txt")
(write-text-file (tmp "a") text-a)
(define nar-a (nar-bytevector (tmp "a")))
(define path-a
  (try "add-text-to-store" (add-text-to-store store name-a text-a)))

(when path-a
  (check "add-text-to-store"
    (all (same "path" path-a (text-path name-a text-a '()))
         (same "contents on disk" (call-with-input-file path-a get-string-all)
               text-a)
         (on-disk-nar-check "text" path-a nar-a))))

;; add-text-to-store with references.
(define text-b (string-append "I refer to " (or path-a "?") "\n" nonce))
(define name-b "store-ops-b.txt")
(write-text-file (tmp "b") text-b)
(define nar-b (nar-bytevector (tmp "b")))
(define path-b
  (and path-a
       (try "add-text-to-store with references"
            (add-text-to-store store name-b text-b (list path-a)))))

(when path-b
  (check "add-text-to-store with references"
    (all (same "path" path-b (text-path name-b text-b (list path-a)))
         (on-disk-nar-check "text" path-b nar-b))))

;; Idempotence: same text again (new connection to defeat the client cache).
(when path-a
  (check "add-text-to-store again (other connection)"
    (let* ((s2 (open-connection))
           (p  (add-text-to-store s2 name-a text-a)))
      (close-connection s2)
      (same "path" p path-a))))

;; add-to-store: flat file, sha256.
(define flat-contents (string-append "flat file contents " nonce "\n"))
(write-text-file (tmp "flat") flat-contents)
(define path-flat
  (try "add-to-store flat sha256"
       (add-to-store store "store-ops-flat" #f "sha256" (tmp "flat"))))
(define nar-flat (nar-bytevector (tmp "flat")))
(when path-flat
  (check "add-to-store flat sha256"
    (all (same "path" path-flat
               (fixed-output-path "store-ops-flat"
                                  (sha256 (string->utf8 flat-contents))
                                  #:hash-algo 'sha256 #:recursive? #f))
         (on-disk-nar-check "flat" path-flat nar-flat))))

;; A directory tree for recursive additions.
(define tree (tmp "tree"))
(mkdir tree)
(mkdir (string-append tree "/sub"))
(mkdir (string-append tree "/sub/empty-dir"))
(write-text-file (string-append tree "/README") (string-append "tree " nonce "\n"))
(write-text-file (string-append tree "/sub/data") (make-string 10000 #\x))
(write-text-file (string-append tree "/sub/empty") "")
(write-text-file (string-append tree "/run.sh") "#!/bin/sh\necho hi\n")
(chmod (string-append tree "/run.sh") #o755)
(symlink "sub/data" (string-append tree "/link"))
(symlink "/nonexistent/target" (string-append tree "/dangling"))
(define nar-tree (nar-bytevector tree))

(define (recursive-add-check algo algo-proc)
  (let* ((name (string-append "store-ops-tree-" (symbol->string algo)))
         (what (string-append "add-to-store recursive "
                              (symbol->string algo)))
         (path (try what (add-to-store store name #t
                                       (symbol->string algo) tree))))
    (when path
      (check what
        (all (same "path" path
                   (fixed-output-path name (algo-proc nar-tree)
                                      #:hash-algo algo #:recursive? #t))
             (on-disk-nar-check what path nar-tree)
             (path-info-checks what store path
                               #:nar nar-tree #:start start-time)
             (same "query-path-hash"
                   (bytevector->base16-string (query-path-hash store path))
                   (bytevector->base16-string (sha256 nar-tree))))))
    path))

(define path-tree (recursive-add-check 'sha256 sha256))
(recursive-add-check 'sha1 sha1)
(recursive-add-check 'sha512 sha512)

;; Recursive addition of a single executable file keeps the x bit.
(define nar-exe (nar-bytevector (string-append tree "/run.sh")))
(let ((path (try "add-to-store recursive executable file"
                 (add-to-store store "store-ops-exe" #t "sha256"
                               (string-append tree "/run.sh")))))
  (when path
    (check "add-to-store recursive executable file"
      (all (same "path" path
                 (fixed-output-path "store-ops-exe" (sha256 nar-exe)))
           (on-disk-nar-check "exe" path nar-exe)
           (if (zero? (logand #o100 (stat:perms (stat path))))
               "not executable" #t)))))

;; valid-path?
(define invalid-path
  (text-path "store-ops-never-added" (string-append "never " nonce) '()))
(check "valid-path? valid"
  (all (same "text" (and path-a (valid-path? store path-a)) #t)
       (same "refs" (and path-b (valid-path? store path-b)) #t)
       (same "flat" (and path-flat (valid-path? store path-flat)) #t)
       (same "tree" (and path-tree (valid-path? store path-tree)) #t)))
(check "valid-path? invalid"
  (same "invalid" (valid-path? store invalid-path) #f))
(check "valid-path? non-store path raises protocol error"
  (raises-protocol-error? (lambda () (valid-path? store "/etc/passwd"))))
(check "connection usable after error"
  (same "valid-path?" (and path-a (valid-path? store path-a)) #t))

;; query-path-info, query-path-hash.
(when path-a
  (check "query-path-info (text)"
    (path-info-checks "text" store path-a #:nar nar-a #:start start-time)))
(when path-b
  (check "query-path-info (text with references)"
    (path-info-checks "text+refs" store path-b #:nar nar-b
                      #:references (list path-a) #:start start-time)))
(when path-flat
  (check "query-path-info (flat)"
    (path-info-checks "flat" store path-flat #:nar nar-flat
                      #:start start-time)))
(check "query-path-info invalid path raises protocol error"
  (raises-protocol-error? (lambda () (query-path-info store invalid-path))))
(when path-b
  (check "query-path-hash"
    (all (same "text" (bytevector->base16-string (query-path-hash store path-a))
               (bytevector->base16-string (sha256 nar-a)))
         (same "text+refs"
               (bytevector->base16-string (query-path-hash store path-b))
               (bytevector->base16-string (sha256 nar-b))))))

;; references / referrers / valid-derivers.
(when path-b
  (check "references"
    (all (same "a" (references store path-a) '())
         (same "b" (references store path-b) (list path-a))))
  (check "referrers"
    (all (if (member path-b (referrers store path-a))
             #t
             (format #f "~a not among referrers of a: ~s" path-b
                     (referrers store path-a)))
         (same "referrers of b" (referrers store path-b) '())))
  (check "valid-derivers (none)"
    (same "valid-derivers" (valid-derivers store path-a) '())))

;; Derivations (added, not built).
(define builder-path
  (try "add-text-to-store builder"
       (add-text-to-store store "store-ops-builder.sh"
                          (string-append "echo " nonce " > $out\n"))))

(define drv
  (and builder-path
       (try "derivation"
            (derivation store (string-append "store-ops-drv-" nonce)
                        "/bin/sh" (list builder-path)
                        #:sources (list builder-path)
                        #:env-vars `(("nonce" . ,nonce))
                        #:outputs '("out" "doc")))))

(when drv
  (let* ((drv-file (derivation-file-name drv))
         (out      (derivation->output-path drv "out"))
         (doc      (derivation->output-path drv "doc"))
         ;; The ATerm serialization, as written by the client.
         (drv-bv   (call-with-values open-bytevector-output-port
                     (lambda (port get)
                       (set-port-encoding! port "UTF-8")
                       (write-derivation drv port)
                       (get)))))
    (write-text-file (tmp "drv") (utf8->string drv-bv))
    (check "derivation file added"
      (all (same "drv path" drv-file
                 (store-path (string-append "text:" builder-path)
                             (sha256 drv-bv)
                             (string-append "store-ops-drv-" nonce ".drv")))
           (same "valid" (valid-path? store drv-file) #t)
           (same "contents" (call-with-input-file drv-file get-bytevector-all)
                 drv-bv)
           (same "references" (references store drv-file)
                 (list builder-path))
           (path-info-checks "drv" store drv-file
                             #:nar (nar-bytevector (tmp "drv"))
                             #:references (list builder-path)
                             #:start start-time)))
    (check "query-derivation-outputs"
      (same "outputs" (sorted (query-derivation-outputs store drv-file))
            (sorted (list out doc))))
    (check "valid-derivers"
      (all (same "out" (valid-derivers store out) (list drv-file))
           (same "doc" (valid-derivers store doc) (list drv-file))))
    (check "outputs not valid (not built)"
      (all (same "out" (valid-path? store out) #f)
           (same "doc" (valid-path? store doc) #f)))
    (check "referrers of derivation source"
      (if (member drv-file (referrers store builder-path))
          #t
          (format #f "~a not among ~s" drv-file
                  (referrers store builder-path))))))

;; A fixed-output derivation: its output path is known independently.
(let* ((name "store-ops-fod")
       (hash (sha256 (string->utf8 nonce)))
       (fod  (try "fixed-output derivation"
                  (derivation store name "builtin:download" '()
                              #:env-vars
                              `(("url" . "\"http://127.0.0.1:1/nothing\""))
                              #:hash hash #:hash-algo 'sha256))))
  (when fod
    (check "query-derivation-outputs (fixed-output)"
      (let ((expected (fixed-output-path name hash #:recursive? #f)))
        (all (same "client-computed" (derivation->output-path fod) expected)
             (same "daemon"
                   (query-derivation-outputs store (derivation-file-name fod))
                   (list expected)))))))

;; GC roots.
(when path-a
  (check "add-temp-root"
    (same "add-temp-root" (add-temp-root store path-a) #t)))

(define link (tmp "indirect-root"))
(when path-b
  (symlink path-b link)
  (check "add-indirect-root"
    (same "add-indirect-root" (add-indirect-root store link) #t))
  (check "find-roots"
    (let ((roots (find-roots store)))
      (format #t "# ~a roots~%" (length roots))
      (if (member (cons link path-b) roots)
          #t
          (format #f "(~s . ~s) not in ~s" link path-b roots)))))

;; export-paths / import-paths.
;;
;; guix-daemon only imports signed archives whose key is in its ACL, so the
;; signed checks need the daemon's key pair in %config-directory (which
;; honours GUIX_CONFIGURATION_DIRECTORY; point it at the daemon's).  If there
;; is none and GUIX_CONFIGURATION_DIRECTORY is set explicitly (a test daemon's),
;; a key pair is generated there and authorized, like 'guix archive
;; --generate-key' + '--authorize' would; /etc/guix is never written to.
(define (export-bv paths . options)
  (call-with-values open-bytevector-output-port
    (lambda (port get)
      (apply export-paths store paths port options)
      (get))))

(define secret-key-file (string-append %config-directory "/signing-key.sec"))
(define public-key-file (string-append %config-directory "/signing-key.pub"))

(define (read-sexp-file file)
  (string->canonical-sexp (call-with-input-file file get-string-all)))

(define key-pair
  (guard (c (#t (format #t "# no usable signing key: ~a~%"
                        (describe-condition c))
                #f))
    (unless (file-exists? secret-key-file)
      (unless (getenv "GUIX_CONFIGURATION_DIRECTORY")
        (raise (condition
                (&message
                 (message (string-append "no " secret-key-file
                                         " and GUIX_CONFIGURATION_DIRECTORY"
                                         " is not set"))))))
      (let* ((pair   (generate-key (string->canonical-sexp
                                    "(genkey (ecc (curve Ed25519) (flags rfc6979)))")))
             (public (find-sexp-token pair 'public-key))
             (secret (find-sexp-token pair 'private-key)))
        (call-with-output-file public-key-file
          (cut display (canonical-sexp->string public) <>))
        (call-with-output-file secret-key-file
          (cut display (canonical-sexp->string secret) <>))
        (chmod secret-key-file #o600)
        (format #t "# generated signing key pair in ~a~%" %config-directory)))
    (let ((public (read-sexp-file public-key-file))
          (secret (read-sexp-file secret-key-file)))
      (unless (authorized-key? public)
        (call-with-output-file %acl-file
          (cut write-acl
               (public-keys->acl (cons public
                                       (acl->public-keys (current-acl))))
               <>))
        (format #t "# authorized the signing key in ~a~%" %acl-file))
      (cons public secret))))

(define (sign-hashed-bytes bytes)
  "Sign BYTES (nar ... deriver of an export entry) like the daemon does."
  (match key-pair
    ((public . secret)
     (canonical-sexp->string
      (signature-sexp (bytevector->hash-data (sha256 bytes)
                                             #:key-type (key-type public))
                      secret public)))))

(define (make-export-stream entries)
  "ENTRIES is a list of (PATH FILE REFERENCES DERIVER SIGN?).  Return an
export stream suitable for 'import-paths', signed with KEY-PAIR when SIGN?."
  (call-with-values open-bytevector-output-port
    (lambda (port get)
      (for-each (match-lambda
                  ((path file refs deriver sign?)
                   (let ((hashed (call-with-values open-bytevector-output-port
                                   (lambda (p get)
                                     (write-file file p)
                                     (write-int %export-magic p)
                                     (write-string path p)
                                     (write-string-list refs p)
                                     (write-string deriver p)
                                     (get)))))
                     (write-int 1 port)
                     (put-bytevector port hashed)
                     (if sign?
                         (begin
                           (write-int 1 port)
                           (write-string (sign-hashed-bytes hashed) port))
                         (write-int 0 port)))))
                entries)
      (write-int 0 port)
      (get))))

(define (export-entries-check entries signed?)
  (match entries
    (((pa nara refsa drva siga hasheda) (pb narb refsb drvb sigb hashedb))
     (all (same "order" (list pa pb) (list path-a path-b))
          (same "nar a" nara nar-a)
          (same "nar b" narb nar-b)
          (same "refs a" refsa '())
          (same "refs b" refsb (list path-a))
          (same "deriver" (list drva drvb) '("" ""))
          (if signed?
              (all (signature-check siga hasheda)
                   (signature-check sigb hashedb))
              (same "signatures" (list siga sigb) '(#f #f)))))
    (_ (format #f "unexpected entries: ~s"
               (map (cut take <> 4) entries)))))

(define (signature-check sig hashed)
  (if (not sig)
      "no signature"
      (let* ((sexp (string->canonical-sexp sig))
             (data (signature-signed-data sexp)))
        (all (same "valid signature" (valid-signature? sexp) #t)
             (same "signer"
                   (and=> (signature-subject sexp) canonical-sexp->string)
                   (canonical-sexp->string (car key-pair)))
             (same "signed hash"
                   (and data (bytevector->base16-string
                              (hash-data->bytevector data)))
                   (bytevector->base16-string (sha256 hashed)))))))

(define unsigned-export
  (and path-b
       (try "export-paths unsigned"
            (export-bv (list path-b) #:sign? #f #:recursive? #t))))

(when unsigned-export
  (check "export-paths unsigned"
    (export-entries-check (parse-export unsigned-export) #f))
  (check "export-paths non-recursive"
    (match (parse-export (export-bv (list path-b) #:sign? #f))
      (((path nar refs deriver #f _))
       (all (same "path" path path-b) (same "nar" nar nar-b)))
      (x (format #f "unexpected ~s" (map (cut take <> 4) x)))))
  (check "import-paths unsigned is rejected"
    (raises-protocol-error?
     (lambda ()
       (import-paths store (open-bytevector-input-port unsigned-export)))))
  (check "connection usable after rejected import"
    (same "valid-path?" (valid-path? store path-a) #t)))

(define new-text (string-append "imported " nonce "\n"))
(define new-name "store-ops-imported.txt")
(define new-refs (if path-a (list path-a) '()))
(define new-path (text-path new-name new-text new-refs))
(write-text-file (tmp "imported") new-text)

(if (not key-pair)
    (for-each (cut skip! <> (format #f "no signing key in ~a"
                                    %config-directory))
              '("export-paths signed" "import-paths signed (already valid)"
                "import-paths (new item)"))
    (begin
      (let ((signed (and path-b
                         (try "export-paths signed"
                              (export-bv (list path-b) #:sign? #t
                                         #:recursive? #t)))))
        (when signed
          (check "export-paths signed"
            (export-entries-check (parse-export signed) #t))
          (check "import-paths signed (already valid)"
            (same "imported"
                  (import-paths store (open-bytevector-input-port signed))
                  (list path-a path-b)))))
      ;; Import of an item that is not in the store yet; the stream is
      ;; produced and signed on the client side.
      (check "import-paths (new item)"
        (let ((nar (nar-bytevector (tmp "imported"))))
          (all (same "valid before" (valid-path? store new-path) #f)
               (same "imported"
                     (import-paths store
                                   (open-bytevector-input-port
                                    (make-export-stream
                                     (list (list new-path (tmp "imported")
                                                 new-refs "" #t)))))
                     (list new-path))
               (same "valid after" (valid-path? store new-path) #t)
               (on-disk-nar-check "imported" new-path nar)
               (path-info-checks "imported" store new-path #:nar nar
                                 #:references new-refs
                                 #:start start-time))))))

(close-connection store)

(system* "rm" "-rf" tmpdir)
(format #t "# ~a passed, ~a failed, ~,2f s~%" passes failures
        (exact->inexact (/ (- (get-internal-real-time) start-clock)
                           internal-time-units-per-second)))
(exit (if (zero? failures) 0 1))
